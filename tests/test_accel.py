"""The GPU path's pieces that run on any machine: torch.compile'd training and inference give what eager gives,
the padded last batch changes nothing, fused optimiser steps only on a GPU, and predict compiles only where it
repays. On the CPU `compile=true` leaves the network eager, so these tests compile with torch's `aot_eager`
backend: the same graph capture (Dynamo, AOT autograd) as on a GPU, without generating kernels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from alldetect.commands.train import train_command
from alldetect.config import load_config
from alldetect.engine import accel, setup
from alldetect.engine.loop import DeviceBatch, predict_probs
from alldetect.engine.optim import create_optimizer
from alldetect.engine.predict import COMPILE_MIN_VIEWS, _compiles
from alldetect.models import create_model

from conftest import FAST, TINY


def _capture_only(module, mode="default", device=None, backend="inductor"):
    return accel.compiled(module, mode, None, backend="aot_eager")


class _Batches(list):
    batch_size = 8


def _batches(n: int, seed: int = 0) -> _Batches:
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
    out = _Batches()
    for start in range(0, n, _Batches.batch_size):
        x = images[start:start + _Batches.batch_size]
        out.append((x, torch.zeros(len(x), dtype=torch.long), torch.arange(start, start + len(x))))
    return out


def test_compiled_inference_with_a_padded_last_batch_gives_the_eager_probabilities():
    torch.manual_seed(0)
    model = create_model("resnet18", input_size=32).eval()
    dev = DeviceBatch(torch.device("cpu"), channels_last=False, amp=False)
    batches = _batches(21)  # 8 + 8 + 5: the last is padded to 8 for the compiled graph
    eager, _ = predict_probs(model, batches, dev)
    compiled, _ = predict_probs(_capture_only(model), batches, dev, static=True)
    assert compiled.shape == (21, 2)
    np.testing.assert_allclose(compiled, eager, atol=1e-5)


def test_pad_batch_pads_with_zero_images_in_the_same_layout():
    x = torch.rand(3, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    padded = accel.pad_batch(x, 5)
    assert padded.shape == (5, 3, 8, 8) and padded.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(padded[:3], x) and not padded[3:].any()
    assert accel.pad_batch(x, 3) is x and accel.pad_batch(x, None) is x


def test_training_with_compile_follows_the_eager_run(tiny_demo, workdir, monkeypatch):
    common = [*FAST, f"data.root={tiny_demo}", "dropout=0"]
    train_command(TINY, "fold0", [*common, "runs_dir=eager"])
    calls = []
    monkeypatch.setattr(setup, "compiled", lambda *a, **k: calls.append(a[0]) or _capture_only(*a, **k))
    train_command(TINY, "fold0", [*common, "runs_dir=compiled", "compile=true"])
    assert len(calls) == 2  # the network that trains and its moving average, which validates
    eager, compiled = (pd.read_csv(workdir / f"{d}/{TINY}/fold0/history.csv") for d in ("eager", "compiled"))
    for column in ("train_loss", "val_loss", "f1", "roc_auc"):
        np.testing.assert_allclose(compiled[column], eager[column], atol=1e-4, err_msg=column)
    oof = [pd.read_csv(workdir / f"{d}/{TINY}/fold0/oof.csv")["prob_all"] for d in ("eager", "compiled")]
    np.testing.assert_allclose(oof[1], oof[0], atol=1e-4)


def test_fused_optimiser_steps_on_a_gpu_and_the_cpu_for_torchs_own_optimisers():
    assert accel.fused_args("adamw", torch.device("cuda")) == {"fused": True}
    assert accel.fused_args("momentum", torch.device("cuda")) == {"fused": True}
    assert accel.fused_args("lamb", torch.device("cuda")) == {}  # timm's own optimisers have no fused kernel
    assert accel.fused_args("adamw", torch.device("cpu")) == {"fused": True}
    assert accel.fused_args("adamw", torch.device("meta")) == {}
    opt = create_optimizer(load_config("resnet50"), create_model("resnet18", input_size=32))
    assert opt.defaults.get("fused") is True


def test_a_run_started_unfused_resumes_unfused_with_the_same_state(monkeypatch):
    """last.pt of a run from before the CPU steps were fused: its optimiser state loads into the fused optimiser,
    which then keeps the run's own (unfused) setting, so the resumed run follows the same arithmetic."""
    import alldetect.engine.optim as optim

    model = create_model("resnet18", input_size=32)
    with monkeypatch.context() as m:
        m.setattr(optim, "fused_args", lambda name, device: {})  # as alldetect built it on the CPU before
        before = create_optimizer(load_config("resnet50"), model)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    before.step()
    now = create_optimizer(load_config("resnet50"), model)
    now.load_state_dict(before.state_dict())
    assert not now.param_groups[0]["fused"]
    assert all(torch.equal(now.state[p]["exp_avg"], before.state[p]["exp_avg"]) for p in model.parameters())


def test_predict_compiles_only_large_sets_on_a_gpu_for_runs_that_compile():
    cfg, gpu = load_config("resnet50", ["compile=true"]), torch.device("cuda")
    assert _compiles(cfg, gpu, COMPILE_MIN_VIEWS, features=False)
    assert not _compiles(cfg, gpu, 2_586, features=False)  # C-NMC's test set: eager is faster than compiling
    assert not _compiles(cfg, gpu, COMPILE_MIN_VIEWS, features=True)  # the feature tap's hooks
    assert not _compiles(cfg, torch.device("cpu"), COMPILE_MIN_VIEWS, features=False)
    assert not _compiles(load_config("resnet50"), gpu, COMPILE_MIN_VIEWS, features=False)


def test_an_unknown_compile_mode_is_refused_by_the_config():
    with pytest.raises(Exception, match="compile_mode"):
        load_config("resnet50", ["compile_mode=fastest"])


def test_the_compile_cache_outlives_tmp(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # recorded as it was, and put back after the test
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert accel.use_compile_cache() == tmp_path / "alldetect" / "torchinductor"
    assert (tmp_path / "alldetect" / "torchinductor").is_dir()

"""The GPU benchmark's bookkeeping (bench/gpu.sh runs it on a lent GPU): which settings it times in what order
under its time budget, and the verdict and config line it prints. Timings are faked; the CPU path runs for real in
test_transforms.py."""

from __future__ import annotations

import math

import pytest
import torch

from alldetect.bench import models

RATES = {"plain": (100, 300), "bf16": (170, 500), "bf16_cl": (200, 560), "compile": (260, 900), "graphs": (300, 1000)}


@pytest.fixture
def fake_gpu(monkeypatch):
    timed = []

    def measure(arch, batch, device, s, train=True, infer=True):
        timed.append((arch, batch, s.name))
        train_rate, infer_rate = RATES[s.name]
        scale = 1.5 if batch > 32 else 1.0  # the bigger batch runs faster, plain too
        return {"train": train_rate * scale if train else math.nan, "infer": infer_rate * scale if infer else math.nan,
                "compile_s": 30.0 if s.compile_mode else 0.0}

    monkeypatch.setattr(models, "measure", measure)
    monkeypatch.setattr(models, "resolve_device", lambda _: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _=None: "Fake H100")
    monkeypatch.setattr(models, "_free", lambda cuda: None)
    monkeypatch.setattr(models, "fill_batch", lambda arch, start, device, cap: 256 if arch == "resnet50" else start)
    return timed


def test_every_arch_gets_its_eager_settings_then_compiled_ones_in_order_of_telling(fake_gpu):
    table = models.run(["resnet50", "proposed"], budget=1e9)
    assert set(table.batch_is) == {"config", "fill"} and len(table) == 4
    compiled = [t for t in fake_gpu if t[2] in ("compile", "graphs")]
    # first CUDA graphs at the config's batch and compile at the filling batch for every arch, then the others
    assert compiled[:3] == [("resnet50", 64, "graphs"), ("resnet50", 256, "compile"), ("proposed", 32, "graphs")]
    assert ("proposed", 32, "compile") in compiled and len(compiled) == len(set(compiled))  # nothing timed twice
    r50 = table[(table.arch == "resnet50") & (table.batch_is == "fill")].iloc[0]
    assert r50.train_best == "graphs" and r50.train_x == pytest.approx(3.0) and r50.infer_x == pytest.approx(1000 / 300)


def test_no_compiled_setting_starts_once_the_budget_is_spent(fake_gpu, capsys):
    table = models.run(["resnet50"], budget=0)
    assert not [t for t in fake_gpu if t[2] in ("compile", "graphs")]
    assert "not measured (--budget 0 s spent): resnet50 graphs at batch 64, resnet50 compile at batch 256" in \
        capsys.readouterr().out
    assert table.iloc[0].train_best == "bf16_cl" and "compile_train" not in table


def test_the_verdict_says_each_goal_and_the_settings_for_the_config(fake_gpu):
    text = models.report(models.run(["resnet50"], budget=1e9))
    line = next(x for x in text.splitlines() if x.startswith("verdict resnet50"))
    assert "train 3.00x at batch 256 (ok, goal 1.5x)" in line and "inference" in line
    # at the config's batch (64: the faked rates x 1.5) CUDA graphs save 255,000 / 300 - 255,000 / 450 = 283 s of a
    # typical run for 30 s of compiling
    assert "config: channels_last=true amp=true compile=true compile_mode=reduce-overhead (saves 283 s" in line
    assert text.splitlines()[-1].startswith("speedup: ")


def test_compiling_is_not_chosen_where_it_would_not_repay_itself(fake_gpu, monkeypatch):
    monkeypatch.setattr(models, "RUN_IMAGES", 1_000)  # a tiny run: 1,000 / 300 - 1,000 / 450 = 1.1 s saved
    line = next(x for x in models.report(models.run(["resnet50"], budget=1e9)).splitlines() if x.startswith("verdict"))
    assert "compile=false (compile saves 1 s a run, costs 30 s)" in line

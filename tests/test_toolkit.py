"""The fine-tuning toolkit: each key acts (schedule, layer-wise decay, freezing, smoothing, mixup/cutmix,
accumulation, clipping, EMA), on tiny models and data so that each test takes seconds."""

import numpy as np
import pytest
import torch
from torch import nn

from alldetect.config import load_config
from alldetect.data.prepare import resolve_folds
from alldetect.engine.fit import fit_fold
from alldetect.engine.loop import DeviceBatch, train_one_epoch
from alldetect.engine.optim import Schedule, create_optimizer
from alldetect.engine.rundir.files import load_checkpoint
from alldetect.engine.setup import Model, build_updater
from alldetect.errors import UserError
from alldetect.models import create_model

from conftest import FAST, TINY


def _cfg(*extra):
    return load_config("proposed", ["wandb=off", *extra])


class Tiny(nn.Module):
    """A linear model on 4 x 4 images: no batch-norm, no dropout, so gradients add up exactly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(48, 2)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _batches(n_batches, size, seed=0, separable=True):
    """uint8 NHWC batches; class 1 images are bright, class 0 dark (separable)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        y = torch.tensor(rng.integers(0, 2, size))
        x = rng.integers(0, 100, (size, 4, 4, 3)) + (100 * y.numpy()[:, None, None, None] if separable else 0)
        out.append((torch.tensor(x, dtype=torch.uint8), y, torch.arange(size)))
    return out


def _train(cfg, model, batches, epochs=1):
    optimizer = create_optimizer(cfg, model)
    per_epoch = -(-len(batches) // cfg.accum_steps)
    updater = build_updater(cfg, Model(model, model, None), optimizer, Schedule(cfg, optimizer, per_epoch), None,
                       torch.device("cpu"), DeviceBatch(torch.device("cpu"), False, False))
    for epoch in range(epochs):
        train_one_epoch(model, batches, updater, updater_dev(), epoch=epoch, seed=0, updates_per_epoch=per_epoch)
    return updater


def updater_dev():
    return DeviceBatch(torch.device("cpu"), False, False)


# ---------------------------------------------------------------- schedule

def _lrs(cfg, updates_per_epoch=10):
    optimizer = create_optimizer(cfg, Tiny())
    schedule = Schedule(cfg, optimizer, updates_per_epoch)
    out = []
    for u in range(cfg.epochs * updates_per_epoch):
        schedule.set(u)
        out.append(schedule.lr)
    return np.array(out)


def test_warmup_rises_linearly_from_lr_over_25_then_the_cosine_falls():
    lrs = _lrs(_cfg("lr=0.01", "epochs=10", "scheduler=cosine", "warmup_epochs=2", "min_lr=0.0001"))
    assert lrs[0] == pytest.approx(0.01 / 25)
    assert np.all(np.diff(lrs[:20]) > 0) and lrs[20] == pytest.approx(0.01)  # 2 epochs x 10 updates of warm-up
    assert np.all(np.diff(lrs[20:]) < 0) and lrs[-1] == pytest.approx(0.0001, rel=0.05)
    no_warmup = _lrs(_cfg("lr=0.01", "epochs=10", "scheduler=cosine"))
    assert no_warmup[0] == pytest.approx(0.01) and np.all(np.diff(no_warmup) < 0)


def test_onecycle_peaks_at_thirty_percent_of_the_run():
    lrs = _lrs(_cfg("lr=0.01", "epochs=10", "scheduler=onecycle"))
    assert int(np.argmax(lrs)) == 30 and lrs.max() == pytest.approx(0.01)
    assert lrs[0] == pytest.approx(0.01 / 25) and lrs[-1] < 0.0001
    assert int(np.argmax(_lrs(_cfg("lr=0.01", "epochs=10", "scheduler=onecycle", "warmup_epochs=5")))) == 50


def test_step_and_constant_schedules():
    step = _lrs(_cfg("lr=0.01", "epochs=6", "scheduler=step", "step_size=2", "gamma=0.5"), updates_per_epoch=5)
    assert step[[0, 9, 10, 20, 29]] == pytest.approx([0.01, 0.01, 0.005, 0.0025, 0.0025])
    assert set(_lrs(_cfg("lr=0.01", "epochs=3", "scheduler=none"))) == {0.01}


def test_warmup_longer_than_the_run_is_a_clear_error():
    with pytest.raises(UserError, match=r"warmup_epochs=5 must be shorter than the run \(epochs=5\)"):
        _lrs(_cfg("epochs=5", "warmup_epochs=5"))


# ---------------------------------------------------------------- layer-wise decay

@pytest.mark.parametrize("arch", ["proposed", "alexnet", "resnet18"])
def test_layer_decay_gives_earlier_layers_smaller_learning_rates(arch):
    model = create_model(arch, input_size=64)
    cfg = _cfg("lr=0.01", "layer_decay=0.5", "epochs=2", "scheduler=none")
    optimizer = create_optimizer(cfg, model)
    Schedule(cfg, optimizer, 1).set(0)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    first, last = next(iter(named.values())), list(named.values())[-1]  # the stem's weight, the head's bias
    assert lr_of[id(last)] == pytest.approx(0.01)
    assert lr_of[id(first)] < 0.01 * 0.5 ** 3  # several groups below the head
    assert len({round(v, 12) for v in lr_of.values()}) >= 5
    plain = create_optimizer(_cfg("lr=0.01"), model)
    assert {g["lr"] for g in plain.param_groups} == {0.01}


def test_weight_decay_spares_biases_and_norms():
    model = create_model("proposed", input_size=32)
    optimizer = create_optimizer(_cfg("weight_decay=0.05"), model)
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert decay_of[id(p)] == (0.05 if p.ndim > 1 else 0.0), name


# ---------------------------------------------------------------- the update

def test_accumulating_two_half_batches_equals_one_whole_batch():
    whole = _batches(1, 8)
    halves = [(x[i:i + 4], y[i:i + 4], r[i:i + 4]) for x, y, r in whole for i in (0, 4)]
    a, b = Tiny(), Tiny()
    _train(_cfg("optimizer=sgd", "momentum=0", "lr=0.5", "scheduler=none", "epochs=1"), a, whole)
    _train(_cfg("optimizer=sgd", "momentum=0", "lr=0.5", "scheduler=none", "epochs=1", "accum_steps=2"), b, halves)
    start = Tiny()
    assert not torch.allclose(a.fc.weight, start.fc.weight)
    assert torch.allclose(a.fc.weight, b.fc.weight, atol=1e-6) and torch.allclose(a.fc.bias, b.fc.bias, atol=1e-6)
    c = Tiny()  # without accumulation the same halves make two updates: another result
    _train(_cfg("optimizer=sgd", "momentum=0", "lr=0.5", "scheduler=none", "epochs=1"), c, halves)
    assert not torch.allclose(a.fc.weight, c.fc.weight, atol=1e-4)


def test_clip_grad_bounds_the_size_of_an_update():
    def moved(*extra):
        model = Tiny()
        _train(_cfg("optimizer=sgd", "momentum=0", "lr=1", "scheduler=none", "weight_decay=0", *extra), model,
               _batches(1, 8))
        start = Tiny()
        with torch.no_grad():
            return float(torch.cat([(model.fc.weight - start.fc.weight).flatten(), model.fc.bias - start.fc.bias]).norm())

    assert moved() > 1.0
    assert moved("clip_grad=0.01") == pytest.approx(0.01, rel=1e-4)


def _train_probs(*extra):
    model = Tiny()
    data = _batches(4, 16, seed=3)
    _train(_cfg("optimizer=adamw", "lr=0.05", "scheduler=none", "weight_decay=0", *extra), model, data, epochs=40)
    x, y, _ = data[0]
    with torch.no_grad():
        p = model(updater_dev().images(x)).softmax(1)
    return p[torch.arange(len(y)), y]


def test_label_smoothing_keeps_predictions_from_saturating():
    sharp, smooth = _train_probs("label_smoothing=0"), _train_probs("label_smoothing=0.2")
    assert sharp.min() > 0.99
    assert smooth.max() < 0.95 and smooth.min() > 0.85  # the optimum is 1 - 0.2 / 2 = 0.9


@pytest.mark.parametrize("key", ["mixup", "cutmix"])
def test_mixup_and_cutmix_mix_pairs_of_images_and_labels_reproducibly(key):
    cfg = _cfg(f"{key}=1.0", "label_smoothing=0")
    model = Tiny()
    optimizer = create_optimizer(cfg, model)
    updater = build_updater(cfg, Model(model, model), optimizer, Schedule(cfg, optimizer, 1), None, torch.device("cpu"),
                       updater_dev())
    x, y, _ = _batches(1, 8)[0]
    x = updater_dev().images(x)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    mixed, target = updater.targets(x.clone(), y, seed=5)
    assert np.array_equal(np.random.get_state()[1], before)  # numpy's global generator is left as it was
    again, target_again = updater.targets(x.clone(), y, seed=5)
    assert torch.equal(mixed, again) and torch.equal(target, target_again)
    other, _ = updater.targets(x.clone(), y, seed=6)
    assert not torch.equal(mixed, other)
    assert target.shape == (8, 2) and torch.allclose(target.sum(1), torch.ones(8))
    lam = target[torch.arange(8), y]  # each image keeps lam of its own label, the rest is its partner's (flip(0))
    partner = x.flip(0)
    if key == "mixup":
        expected = lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * partner
        same_label = y == y.flip(0)
        assert torch.allclose(mixed[~same_label], expected[~same_label], atol=1e-5)
    else:  # a rectangle of the partner's pixels, the rest unchanged
        from_self, from_partner = torch.isclose(mixed, x), torch.isclose(mixed, partner)
        assert bool((from_self | from_partner).all())
        assert 0 < (~from_self).float().mean() < 1


@pytest.mark.parametrize("key", ["mixup=0.4", "cutmix=1.0"])
@pytest.mark.parametrize("size", [3, 5])
def test_an_odd_batch_is_mixed_too_all_but_its_last_image(key, size):
    """batch_size=3 used to leave every batch unmixed (timm mixes even batches only): the key did nothing."""
    cfg = _cfg(key, "label_smoothing=0", f"batch_size={size}")
    model = Tiny()
    optimizer = create_optimizer(cfg, model)
    updater = build_updater(cfg, Model(model, model), optimizer, Schedule(cfg, optimizer, 1), None, torch.device("cpu"),
                       updater_dev())
    torch.manual_seed(0)
    x, y = torch.rand(size, 3, 32, 32), torch.tensor([0, 1] * (size // 2) + [1])
    mixed, target = updater.targets(x.clone(), y, seed=3)
    again, target_again = updater.targets(x.clone(), y, seed=3)
    assert torch.equal(mixed, again) and torch.equal(target, target_again)
    assert target.shape == (size, 2) and torch.allclose(target.sum(1), torch.ones(size))
    for i in range(size - 1):  # each pair (i, n-2-i) of different labels: both images and labels mixed
        assert not torch.equal(mixed[i], x[i]), i
        assert 0 < target[i, y[i]] < 1, i
    assert torch.equal(mixed[-1], x[-1]) and target[-1, 1] == 1  # the odd one out stays itself


# ---------------------------------------------------------------- in a real run

@pytest.mark.slow
def test_frozen_backbone_trains_only_the_head_for_freeze_epochs(tiny_demo, workdir):
    from test_train import Interrupt, _stop_after

    extra = [*FAST, f"data.root={tiny_demo}", "freeze_epochs=1", "epochs=2"]
    folds = resolve_folds(load_config("proposed", extra))
    with pytest.raises(Interrupt):  # after the first epoch, the frozen one
        fit_fold(load_config("proposed", extra), 0, folds, on_epoch=_stop_after(0))
    torch.manual_seed(42)
    start = create_model("proposed", input_size=32).state_dict()
    after_one = load_checkpoint(workdir / "runs/proposed/fold0/last.pt").model
    params = dict(create_model("proposed", input_size=32).named_parameters())
    for name in params:
        frozen = not name.startswith("classifier")
        assert torch.equal(after_one[name], start[name]) == frozen, name
    fit_fold(load_config("proposed", [*extra, "resume=true"]), 0, folds)
    after_two = load_checkpoint(workdir / "runs/proposed/fold0/last.pt").model
    assert not torch.equal(after_two["features.0.weight"], start["features.0.weight"])


@pytest.mark.slow
def test_ema_is_evaluated_kept_in_best_pt_and_resumed_exactly(tiny_demo, workdir):
    from test_train import Interrupt, _stop_after

    extra = [*FAST, f"data.root={tiny_demo}", "ema=true", "ema_decay=0.9", "select=ema", "epochs=3"]
    folds = resolve_folds(load_config(TINY, extra))
    fit_fold(load_config(TINY, [*extra, "runs_dir=a"]), 0, folds)
    with pytest.raises(Interrupt):
        fit_fold(load_config(TINY, [*extra, "runs_dir=b"]), 0, folds, on_epoch=_stop_after(1))
    fit_fold(load_config(TINY, [*extra, "runs_dir=b", "resume=true"]), 0, folds)
    for run in ("a", "b"):
        last = load_checkpoint(workdir / run / TINY / "fold0/last.pt")
        best = load_checkpoint(workdir / run / TINY / "fold0/best.pt")
        assert all(torch.equal(best.model[k], last.ema[k]) for k in last.ema)
        first = next(iter(last.model))  # the first convolution's weights
        assert not torch.equal(last.ema[first], last.model[first])
    a = load_checkpoint(workdir / "a" / TINY / "fold0/last.pt")
    b = load_checkpoint(workdir / "b" / TINY / "fold0/last.pt")
    assert all(torch.equal(a.ema[k], b.ema[k]) and torch.equal(a.model[k], b.model[k]) for k in a.ema)


def test_select_ema_without_ema_and_patience_on_a_fixed_schedule_are_clear_errors():
    with pytest.raises(UserError, match="select=ema keeps the averaged weights: add ema=true"):
        _cfg("select=ema", "ema=false")
    with pytest.raises(UserError, match="select=last trains a fixed schedule.*patience=0.*select=inner"):
        _cfg("select=last", "patience=3")
    with pytest.raises(UserError, match="lr=.inf.: must be a finite number"):
        _cfg("lr=inf")


@pytest.mark.slow
def test_every_key_on_stopped_mid_accumulation_resumes_to_the_same_weights(tiny_demo, workdir, monkeypatch):
    """SIGTERM inside an accumulation: the step finishes, the stop waits for the update, and resume=true reaches
    the weights (raw and averaged), history and predictions of an uninterrupted run."""
    from test_reliability import SignalAt, _same_history

    import alldetect.engine.fit as fit
    from alldetect.engine.stopping import StopRequested

    extra = [*FAST, f"data.root={tiny_demo}", "epochs=3", "batch_size=4", "accum_steps=2", "mixup=0.4",
             "cutmix=0.5", "label_smoothing=0.1", "ema=true", "select=ema", "warmup_epochs=1", "clip_grad=1",
             "layer_decay=0.8", "freeze_epochs=1", "scheduler=onecycle", "aug.rotate=0.5"]
    folds = resolve_folds(load_config(TINY, extra))
    fit_fold(load_config(TINY, [*extra, "runs_dir=a"]), 0, folds)
    SignalAt.n, SignalAt.at = 0, 7  # epoch 2 (6 batches an epoch), its first batch: inside an accumulation
    monkeypatch.setattr(fit.nn, "CrossEntropyLoss", SignalAt)
    with pytest.raises(StopRequested, match=r"stopped by SIGTERM in epoch 2 after batch 2"):
        fit_fold(load_config(TINY, [*extra, "runs_dir=b"]), 0, folds)
    monkeypatch.setattr(fit.nn, "CrossEntropyLoss", torch.nn.CrossEntropyLoss)
    fit_fold(load_config(TINY, [*extra, "runs_dir=b", "resume=true"]), 0, folds)
    a = load_checkpoint(workdir / "a" / TINY / "fold0/last.pt")
    b = load_checkpoint(workdir / "b" / TINY / "fold0/last.pt")
    for key in ("model", "ema"):
        assert all(torch.equal(getattr(a, key)[k], getattr(b, key)[k]) for k in getattr(a, key)), key
    _same_history(workdir / "a" / TINY / "fold0", workdir / "b" / TINY / "fold0")
    assert (workdir / "a" / TINY / "fold0/oof.csv").read_text() == (workdir / "b" / TINY / "fold0/oof.csv").read_text()

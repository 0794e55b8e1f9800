"""recipe=finetune (configs/recipes/finetune.yaml): the fine-tuning settings for an ImageNet-pretrained CNN load
through the config layers and act on the optimiser as the file says (pretrained weights, a 3e-4 peak reached by the
head only, layer-wise decay down to the stem, a head-only first epoch, milder colour jitter)."""

import pytest

from alldetect.config import load_config
from alldetect.engine.optim import Schedule, create_optimizer
from alldetect.models import create_model

ARCH = "tf_efficientnet_lite0"


def test_finetune_recipe_sets_the_pretrained_fine_tuning_fields():
    cfg = load_config(ARCH, ["recipe=finetune", "input_size=96", "epochs=15"])
    base = load_config(ARCH, ["input_size=96", "epochs=15"])
    assert cfg.recipe == "finetune"
    assert cfg.pretrained is True and base.pretrained is False
    assert cfg.lr == pytest.approx(3e-4) and base.lr == pytest.approx(1e-3)
    assert cfg.layer_decay == pytest.approx(0.8) and base.layer_decay is None
    assert cfg.lr_stages is None  # layer_decay and lr_stages exclude each other
    assert cfg.freeze_epochs == 1 and cfg.warmup_epochs == 1
    assert cfg.aug.jitter_strength == pytest.approx(0.1) and base.aug.jitter_strength == pytest.approx(0.25)
    assert cfg.aug.color_jitter == pytest.approx(0.8) and cfg.aug.stain == pytest.approx(0.5)
    # what the recipe leaves alone stays as the defaults have it
    for key in ("optimizer", "scheduler", "weight_decay", "label_smoothing", "ema", "select"):
        assert getattr(cfg, key) == getattr(base, key), key
    assert load_config(ARCH, ["recipe=finetune", "lr=1e-4"]).lr == pytest.approx(1e-4)  # overrides still win


def test_finetune_recipe_gives_the_head_the_peak_and_the_stem_the_least():
    cfg = load_config(ARCH, ["recipe=finetune", "pretrained=false", "input_size=64", "epochs=15"])
    model = create_model(ARCH, input_size=64)
    opt = create_optimizer(cfg, model)
    schedule = Schedule(cfg, opt, updates_per_epoch=10)
    schedule.set(10)  # the end of the one-epoch warm-up: the peak
    rate = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = {n: rate[id(p)] for n, p in model.named_parameters()}
    assert named["classifier.weight"] == pytest.approx(3e-4)
    assert named["conv_stem.weight"] == pytest.approx(3e-4 * 0.8 ** 17)  # timm: stem, 16 blocks, head
    last_block = max((n for n in named if n.startswith("blocks.")), key=lambda n: tuple(map(int, n.split(".")[1:3])))
    assert named[last_block] == pytest.approx(3e-4 * 0.8)
    assert schedule.lr == pytest.approx(3e-4)

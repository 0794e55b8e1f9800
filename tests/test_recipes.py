"""The published C-NMC recipes (configs/recipes/): each trains from a weights file standing in for ImageNet's, and
the settings they need act as the papers describe."""

import pytest
import timm
import torch

from alldetect.config import load_config
from alldetect.data.prepare import resolve_folds
from alldetect.engine.fit import fit_fold
from alldetect.engine.optim import Schedule, create_optimizer
from alldetect.engine.rundir.files import load_checkpoint
from alldetect.errors import UserError
from alldetect.models import create_model

TINY = ["input_size=64", "data.crop=0", "epochs=1", "max_batches=1", "batch_size=4", "data.num_workers=0",
        "wandb=off", "data.k=3"]


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "arch"), [("prellberg", "seresnext50_32x4d"), ("pan", "resnet50")])
def test_paper_recipes_train_from_a_local_weights_file(recipe, arch, tiny_demo, workdir):
    torch.manual_seed(0)
    donor = timm.create_model(arch, num_classes=1000).state_dict()
    torch.save(donor, workdir / "imagenet.pth")
    cfg = load_config(arch, [f"recipe={recipe}", f"pretrained_path={workdir / 'imagenet.pth'}",
                             f"data.root={tiny_demo}", *TINY])
    assert cfg.pretrained and cfg.aug.color_jitter == 0
    fit_fold(cfg, 0, resolve_folds(cfg))
    trained = load_checkpoint(workdir / f"runs/{arch}/fold0/last.pt")
    assert trained.meta.config.recipe == recipe
    stem = trained.model["conv1.weight"]
    # started from the file, not from a random initialisation (one small step moves a weight by about lr at most)
    assert (stem - donor["conv1.weight"]).abs().max() < (1e-5 if recipe == "prellberg" else 1e-2)
    assert not torch.equal(trained.model["fc.weight"][:, :8], torch.zeros(2, 8))


def test_lr_stages_give_each_layer_group_its_rate_through_the_schedule():
    cfg = load_config("resnet18", ["lr_stages=[1e-6, 1e-6, 1e-4, 1e-4, 1e-4, 1e-2]", "scheduler=step", "step_size=2",
                                   "gamma=0.1", "epochs=6", "weight_decay=0.05"])
    assert cfg.lr == 1e-2  # the peak: what the schedule moves
    model = create_model("resnet18", input_size=64)
    opt = create_optimizer(cfg, model)
    schedule = Schedule(cfg, opt, updates_per_epoch=10)
    rate = {id(p): None for p in model.parameters()}
    for update, factor in ((0, 1.0), (25, 0.1), (45, 0.01)):  # epochs 0-1, 2-3, 4-5
        schedule.set(update)
        for group in opt.param_groups:
            for p in group["params"]:
                rate[id(p)] = (group["lr"], group["weight_decay"])
        named = {n: rate[id(p)] for n, p in model.named_parameters()}
        assert named["conv1.weight"][0] == pytest.approx(1e-6 * factor)
        assert named["layer1.0.conv1.weight"][0] == pytest.approx(1e-6 * factor)
        assert named["layer2.0.conv1.weight"][0] == pytest.approx(1e-4 * factor)
        assert named["layer4.1.conv2.weight"][0] == pytest.approx(1e-4 * factor)
        assert named["fc.weight"][0] == pytest.approx(1e-2 * factor)
        assert named["fc.weight"][1] == 0.05 and named["fc.bias"][1] == 0.0 and named["bn1.weight"][1] == 0.0


def test_lr_stages_of_the_wrong_length_say_how_many_groups_the_network_has():
    cfg = load_config("resnet18", ["lr_stages=[1e-4, 1e-2]"])
    with pytest.raises(UserError, match="this network has 6 layer groups"):
        create_optimizer(cfg, create_model("resnet18", input_size=64))
    with pytest.raises(UserError, match="choose one"):
        load_config("resnet18", ["lr_stages=[1e-4, 1e-2]", "layer_decay=0.7"])
    with pytest.raises(UserError, match="one positive learning rate per layer group"):
        load_config("resnet18", ["lr_stages=[0, 1e-2]"])


def test_a_small_rotation_limit_keeps_rotations_small():
    import numpy as np

    from alldetect.config import AugConfig
    from alldetect.data.transforms import create_transform

    img = np.zeros((41, 41, 3), np.uint8)
    img[20, 30] = 255  # one bright pixel 10 px right of the centre
    t = create_transform(AugConfig(rot90=0, rot270=0, hflip=0, vflip=0, rotate=1.0, rotate_limit=11.5))
    for seed in range(50):
        y, x = np.unravel_index(t(img, seed)[..., 0].argmax(), (41, 41))
        assert abs(np.degrees(np.arctan2(y - 20, x - 20))) <= 11.5 + 6  # a pixel's width at 10 px is ~6 degrees

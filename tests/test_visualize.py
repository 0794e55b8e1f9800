"""`alldetect visualize`: feature maps of every convolution block and Grad-CAM, for the report's network and timm's."""

import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from alldetect.cli import main
from alldetect.commands.visualize import visualize_command
from alldetect.errors import UserError
from alldetect.models import create_model
from alldetect.visualize import Block, cam_block, conv_blocks, grad_cam, to_nchw

from fake_runs import edit_checkpoint, make_run


@pytest.mark.parametrize("arch, first, last, count", [
    ("proposed", "features.8", "features.43", 6),  # the last ReLU of each of the six blocks, before its pool
    ("alexnet", "features.1", "features.11", 3),
    ("vgg16", "features.3", "features.29", 5),  # timm lists the pool after the last block too: left out
    ("resnet50", "act1", "layer4", 5),
    ("inception_v3", "Conv2d_2b_3x3", "Mixed_7c", 5),
])
def test_conv_blocks_end_where_each_architecture_ends_a_block(arch, first, last, count):
    with torch.device("meta"):  # shapes only: no memory, no time
        model = create_model(arch)
    blocks = conv_blocks(model)
    assert (blocks[0].name, blocks[-1].name, len(blocks)) == (first, last, count)


def test_grad_cam_points_at_the_region_that_drives_the_class():
    """A network whose `all` logit is the mean brightness of its input: Grad-CAM of `all` must light up the
    bright square and nothing else."""
    model = nn.Sequential(nn.Conv2d(3, 1, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
        model[4].weight.copy_(torch.tensor([[-1.0], [1.0]]))
        model[4].bias.zero_()
    x = torch.zeros(1, 3, 32, 32)
    x[:, :, 4:12, 4:12] = 1.0
    heat = grad_cam(model.eval(), Block("1", model[1]), x.requires_grad_(True), target=1)
    assert heat.shape == (32, 32)
    assert heat[4:12, 4:12].min() > 0.9 and heat[16:, 16:].max() < 0.05


def test_grad_cam_layer_is_the_last_block_with_a_map_of_at_least_7_x_7_unless_named():
    with torch.device("meta"):
        model = create_model("proposed", input_size=300)
    blocks = conv_blocks(model)
    at_300 = [torch.empty(1, 1, s, s) for s in (300, 150, 75, 38, 19, 10)]
    at_64 = [torch.empty(1, 1, s, s) for s in (64, 32, 16, 8, 4, 2)]
    assert cam_block(model, blocks, at_300, None).name == "features.43"  # the last block, as usual
    assert cam_block(model, blocks, at_64, None).name == "features.29"  # 8 x 8, not the last block's 2 x 2
    assert cam_block(model, blocks, [torch.empty(1, 1, 2, 2)] * 6, None).name == "features.43"
    assert cam_block(model, blocks, at_64, "features.36").name == "features.36"
    with pytest.raises(UserError, match="--layer layer4: ProposedCNN has no module of that name; its blocks are "
                                        "features.8, features.15"):
        cam_block(model, blocks, at_64, "layer4")


def test_block_outputs_of_transformers_and_channels_last_models_become_feature_maps():
    tokens = torch.arange(2 * 17 * 8, dtype=torch.float32).reshape(2, 17, 8)  # a class token and 4 x 4 patches
    maps = to_nchw(tokens)
    assert maps.shape == (2, 8, 4, 4)
    assert torch.equal(maps[0, :, 0, 0], tokens[0, 1])  # the first patch, not the class token
    nhwc = torch.randn(1, 7, 7, 96)
    assert torch.equal(to_nchw(nhwc, channels=96), nhwc.permute(0, 3, 1, 2))


def _pngs_referenced(index):
    sources = re.findall(r'<img src="([^"]+)"', index.read_text())
    for src in sources:
        with Image.open(index.parent / src) as im:
            im.verify()
            assert im.format == "PNG"
    return sources


# Grad-CAM at the last block whose map is at least 7 x 7: at 32 x 32, proposed's third (8 x 8), resnet10t's layer1.
@pytest.mark.slow
@pytest.mark.parametrize("arch, size, blocks, cam_at", [("proposed", 32, 6, "features.22"),
                                                        ("resnet10t", 32, 5, "layer1")])
def test_visualize_writes_feature_grids_of_every_block_and_grad_cam(workdir, tiny_demo, capsys, arch, size, blocks,
                                                                    cam_at):
    run = make_run(workdir / "runs" / arch / "fold0", arch, weights=True, input_size=size)
    images = sorted(tiny_demo.glob("C-NMC_training_data/fold_*/*/*.bmp"))[:2]
    folder = visualize_command(str(run), [str(p) for p in images], device="cpu")
    assert folder.resolve() == workdir / "reports" / "visualize" / f"{arch}_fold0"
    for image in images:
        written = sorted(p.name for p in (folder / image.stem).iterdir())
        assert written == sorted(["gradcam.png", *(f"block{i}.png" for i in range(1, blocks + 1))])
    sources = _pngs_referenced(folder / "index.html")
    assert len(sources) == 2 * (blocks + 1)
    assert re.search(rf"Grad-CAM of '(all|hem)' at {cam_at}\b", (folder / "README.md").read_text())
    out = capsys.readouterr().out
    assert all(re.search(rf"{re.escape(str(p))}: p\(all\) [=<>] ", out) for p in images)


def test_unreadable_image_stops_before_any_work_and_names_it(workdir, tiny_demo, capsys):
    run = make_run(workdir / "runs" / "proposed" / "fold0", "proposed", weights=True, input_size=32)
    good = next(tiny_demo.glob("C-NMC_training_data/fold_*/*/*.bmp"))
    (workdir / "broken.bmp").write_bytes(b"BM not really")
    Image.new("L", (64, 64)).save(workdir / "grey.png")  # training refuses it: so does visualize
    assert main(["visualize", str(run), str(good), "broken.bmp", "absent.png", "grey.png"]) == 2
    err = capsys.readouterr().err
    assert "cannot use 3 image(s): broken.bmp (not a readable image" in err
    assert "absent.png (missing), grey.png (greyscale, not 24-bit RGB)" in err
    assert not (workdir / "reports").exists()


def test_checkpoint_that_does_not_fit_its_config_is_a_clear_error(workdir, tiny_demo, capsys):
    run = make_run(workdir / "runs" / "proposed" / "fold0", "proposed", weights=True, input_size=32)
    edit_checkpoint(run / "best.pt", config={"input_size": 128})  # the classifier's input grows with the image
    image = next(tiny_demo.glob("C-NMC_training_data/fold_*/*/*.bmp"))
    assert main(["visualize", str(run), str(image)]) == 2
    assert "weights do not fit a proposed at input size 128" in capsys.readouterr().err


@pytest.mark.slow
def test_visualize_a_vision_transformer(workdir, tiny_demo):
    """Token outputs (no spatial map of their own) are arranged as the patch grid for both pictures."""
    run = make_run(workdir / "runs" / "vit" / "fold0", "vit_tiny_patch16_224", weights=True, input_size=224)
    image = next(tiny_demo.glob("C-NMC_training_data/fold_*/*/*.bmp"))
    folder = visualize_command(str(run), [str(image)])
    assert len(_pngs_referenced(folder / "index.html")) == 13  # Grad-CAM and 12 transformer blocks
    assert np.asarray(Image.open(folder / image.stem / "gradcam.png")).std() > 0

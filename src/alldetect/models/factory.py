"""One factory for every architecture, by name: the report's five, and any timm model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from alldetect.errors import UserError
from alldetect.models import packaged
from alldetect.models.names import MIN_INPUT, check_timm_name, default_input_size
from alldetect.models.proposed import ProposedCNN, conv_group_matcher

if TYPE_CHECKING:
    from alldetect.config import Config

def create_model(name: str, num_classes: int = 2, dropout: float = 0.5, pretrained: bool = False,
                 pretrained_path: str | None = None, input_size: int | None = None,
                 subtract_mean: bool = False) -> nn.Module:
    """Build `name` with a `num_classes` head. pretrained loads ImageNet weights: from an installed package for
    the EfficientNet-Lites (models/packaged.py), from `pretrained_path` when given, else from a hub; without a
    network the hub fails with a message saying what to do.
    subtract_mean: the network subtracts each image's mean colour from its input first (Pan et al.'s C-NMC
    preprocessing), as a forward pre-hook, so that training, prediction, TTA and export all do it."""
    size = input_size or default_input_size(name)
    if size < MIN_INPUT.get(name, 32):
        raise UserError(f"input_size={size} is too small for {name}; use at least {MIN_INPUT.get(name, 32)}")
    if name == "proposed":
        if pretrained or pretrained_path:
            raise UserError("the proposed network has no ImageNet weights; use pretrained=false")
        model = ProposedCNN(num_classes, dropout, size)
    elif name == "alexnet":
        model = _alexnet(num_classes, dropout, pretrained, pretrained_path)
    else:
        model = _timm(name, num_classes, dropout, pretrained, pretrained_path)
    if subtract_mean:
        model.register_forward_pre_hook(subtract_image_mean)
    return model


def model_from_config(cfg: Config) -> nn.Module:
    """The network a run's config (a checkpoint's) describes, without pretrained weights: what predict, export,
    report and visualize rebuild before loading a checkpoint's weights."""
    return create_model(cfg.arch, num_classes=2, dropout=cfg.dropout,
                        input_size=cfg.resolved_input_size, subtract_mean=cfg.subtract_mean)


def subtract_image_mean(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: N x C x H x W -> minus each image's per-channel mean (over all its pixels)."""
    x = args[0]
    return (x - x.mean(dim=(2, 3), keepdim=True), *args[1:])


def _alexnet(num_classes, dropout, pretrained, pretrained_path):
    from torchvision.models import AlexNet_Weights, alexnet

    model = alexnet(weights=None, dropout=dropout)
    if pretrained_path:
        state = _load_weights_file(pretrained_path)
        state = {k: v for k, v in state.items() if not k.startswith("classifier.6.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"classifier.6.weight", "classifier.6.bias"}:
            raise UserError(f"{pretrained_path} does not hold torchvision AlexNet weights "
                            f"(unexpected: {unexpected[:3]}, missing: {missing[:3]})")
    elif pretrained:
        try:
            state = AlexNet_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception as e:  # urllib raises several kinds offline
            raise _offline_error("alexnet", e) from None
        model.load_state_dict(state)
    model.classifier[6] = nn.Linear(4096, num_classes)
    # what timm models carry: layer groups for layer-wise lr decay, and the head's name (freeze_epochs)
    model.group_matcher = lambda coarse=False: conv_group_matcher(model.features, coarse)
    model.pretrained_cfg = {"classifier": "classifier"}
    return model


def _timm(name, num_classes, dropout, pretrained, pretrained_path):
    import timm

    check_timm_name(name)
    if packaged.has_packaged_weights(name) and (pretrained or pretrained_path):
        path = Path(pretrained_path) if pretrained_path else packaged.packaged_weights_file(name)
        state = _load_weights_file(str(path))
        if packaged.is_efficientnet_pytorch_state(state):  # the packages' layout; timm's own files load below
            model = timm.create_model(name, num_classes=1000, drop_rate=dropout)
            packaged.load_efficientnet_pytorch(model, state, str(path))
            model.reset_classifier(num_classes)
            return model
    kwargs = dict(num_classes=num_classes, drop_rate=dropout)
    if pretrained_path:
        if not Path(pretrained_path).is_file():
            raise UserError(f"pretrained_path={pretrained_path} does not exist")
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(pretrained_path)))
    else:
        kwargs.update(pretrained=pretrained)
    try:
        return timm.create_model(name, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        if pretrained and not pretrained_path:
            raise _offline_error(name, e) from None
        raise UserError(f"cannot build {name}{' from ' + str(pretrained_path) if pretrained_path else ''}: {e}") from None


def _offline_error(name: str, err: Exception) -> UserError:
    return UserError(
        f"cannot download ImageNet weights for {name} ({type(err).__name__}: {str(err)[:200]}). This machine may be "
        f"offline. Use a network whose ImageNet weights install from the package index "
        f"({', '.join(sorted(packaged.PACKAGED))}: pretrained=true works offline), train from scratch with "
        f"pretrained=false, or download the weights elsewhere and pass pretrained_path=/path/to/weights "
        f"(.pth or .safetensors)"
    )


def _load_weights_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"pretrained_path={path} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign and pickled-code files all land here
        raise UserError(f"cannot load weights from {path} (damaged or not a weights file: "
                        f"{str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} holds no weights (a {type(state).__name__}, not a state dict)")
    return state.get("state_dict", state)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, batch-norm running-statistic elements), as Keras counts the two."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stats = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))
    return trainable, stats

"""`alldetect visualize RUN IMAGE...`: what a trained network sees in a cell.

Per image: a grid of the feature maps at the end of every convolution block (the study's section 3.6.1), and
a Grad-CAM heat map (the `grad-cam` package) of the predicted class over the cell. Written to
<out>/<arch>_fold<k>/<image>/, with an index.html and README.md that show them all.

A "block" is what the architecture calls one: for networks with a `features` stack (the proposed CNN,
AlexNet) everything up to each pooling layer; for timm models the stages timm lists in `feature_info`
(ResNet's layer1..4, Inception's Mixed_* blocks, VGG's pre-pool activations, ...). Grad-CAM looks at the last
block whose map is still at least 7 x 7: the last block at each network's own input size (proposed at 300:
10 x 10 before its last pool; ResNet50's layer4 at 224: 7 x 7; Inception's Mixed_7c at 299: 8 x 8), an
earlier one at the demo's 64 x 64, where the last block is 2 x 2. `--layer NAME` chooses another module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from alldetect import plots
from alldetect.atomic import safe_name
from alldetect.data.images import check_image, read_rgb
from alldetect.engine.loop import logits_of
from alldetect.errors import UserError, short_list
from alldetect.page import Figure, Heading

log = logging.getLogger("alldetect")

MAX_CHANNELS = 32  # feature maps shown per block: the most active ones
MIN_CAM_SIDE = 7  # Grad-CAM at the last block whose map is at least this many cells on a side
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass
class Block:
    name: str  # the module's name in the model, e.g. layer4 or features.41
    module: nn.Module
    channels: int | None = None  # as timm's feature_info lists them (tells channels-last maps apart)

    def nchw(self, activation: torch.Tensor) -> torch.Tensor:
        return to_nchw(activation, self.channels)


def conv_blocks(model: nn.Module) -> list[Block]:
    """The outputs that end each convolution block, in order (see the module docstring)."""
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential) and any(isinstance(m, POOLS) for m in features):
        blocks = [Block(f"features.{i - 1}", features[i - 1]) for i, m in enumerate(features)
                  if isinstance(m, POOLS) and i > 0 and not isinstance(features[i - 1], POOLS)]
        return blocks
    info = getattr(model, "feature_info", None)
    if info is not None:
        modules = dict(model.named_modules())
        blocks = [Block(f["module"], modules[f["module"]], f.get("num_chs")) for f in info
                  if f["module"] in modules and not isinstance(modules[f["module"]], POOLS)]
        if blocks:
            return blocks
    blocks = [Block(n, m) for n, m in model.named_children() if any(isinstance(c, nn.Conv2d) for c in m.modules())]
    if not blocks:
        raise UserError(f"{type(model).__name__} has no convolution blocks to show (no Conv2d layers found)")
    return blocks


def to_nchw(activation: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    """A block's output as N x C x H x W: token sequences (vision transformers, N x tokens x C) become a
    square grid of their patch tokens; channels-last maps (N x H x W x C) are permuted."""
    if activation.dim() == 4:
        if channels is not None and activation.shape[1] != channels and activation.shape[-1] == channels:
            return activation.permute(0, 3, 1, 2)
        return activation
    if activation.dim() == 3:
        n, tokens, c = activation.shape
        side = int(np.sqrt(tokens))
        prefix = tokens - side * side  # class / register tokens come first
        if side < 1 or prefix < 0:
            raise UserError(f"cannot arrange {tokens} tokens as a square grid of patches")
        return activation[:, prefix:].reshape(n, side, side, c).permute(0, 3, 1, 2)
    raise UserError(f"a block output of shape {tuple(activation.shape)} has no spatial map to show")


def capture(model: nn.Module, blocks: list[Block], x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every block's output (N x C x H x W, detached copies) and the model's softmax output."""
    outputs: list[torch.Tensor] = []

    def hook(block: Block):
        def keep(_module, _inputs, output):
            output = output[0] if isinstance(output, (tuple, list)) else output
            outputs.append(block.nchw(output).detach().clone())

        return keep

    handles = [b.module.register_forward_hook(hook(b)) for b in blocks]
    try:
        with torch.no_grad():
            probs = torch.softmax(logits_of(model(x)).float(), dim=1)
    finally:
        for h in handles:
            h.remove()
    return outputs, probs


def feature_maps(activation: torch.Tensor, limit: int = MAX_CHANNELS) -> tuple[np.ndarray, list[int]]:
    """The `limit` channels with the largest mean activation, each scaled to [0, 1]."""
    maps = activation[0].float()
    order = torch.argsort(maps.mean(dim=(1, 2)), descending=True)[:limit]
    chosen = maps[order]
    low = chosen.amin(dim=(1, 2), keepdim=True)
    high = chosen.amax(dim=(1, 2), keepdim=True)
    scaled = (chosen - low) / (high - low).clamp_min(1e-12)
    return scaled.cpu().numpy(), order.tolist()


def grad_cam(model: nn.Module, block: Block, x: torch.Tensor, target: int) -> np.ndarray:
    """Grad-CAM (pytorch_grad_cam) of class `target` at `block`: H x W in [0, 1] at the input's size."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    class Logits(nn.Module):  # Grad-CAM needs a tensor; Inception-style models may return tuples
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, inputs):
            return logits_of(self.inner(inputs))

    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # Grad-CAM needs gradients of activations only: skip the weights' (most of the work)
        p.requires_grad_(False)
    try:
        with GradCAM(model=Logits(model), target_layers=[block.module], reshape_transform=block.nchw) as cam:
            heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return np.nan_to_num(heat[0])


def check_images(images: list[str]) -> list[np.ndarray]:
    """Check and read every image first (by the rule training uses), so that one bad file stops the command before
    any work, naming them all."""
    read, bad = [], []
    for path in images:
        problem = check_image(Path(path))[3] if Path(path).is_file() else "missing"
        if problem:
            bad.append(f"{path} ({problem})")
            continue
        try:
            read.append(read_rgb(Path(path)))
        except UserError:
            bad.append(f"{path} (unreadable)")
    if bad:
        raise UserError(f"cannot use {len(bad)} image(s): {short_list(bad)}; name 24-bit RGB image files "
                        "(BMP, PNG, JPEG, TIFF), as training uses")
    return read


def unique_stems(images: list[str]) -> list[str]:
    stems: list[str] = []
    seen: dict[str, int] = {}
    for path in images:
        stem = safe_name(Path(path).stem)
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return stems


def cam_block(model: nn.Module, blocks: list[Block], activations: list[torch.Tensor], layer: str | None) -> Block:
    """Where Grad-CAM looks: `layer` when named, else the last block whose map is at least MIN_CAM_SIDE on a
    side (the last block at the networks' own input sizes; an earlier one at small inputs, where the last
    block's 2 x 2 map would say nothing), else the block with the largest map."""
    if layer:
        modules = dict(model.named_modules())
        if layer not in modules:
            raise UserError(f"--layer {layer}: {type(model).__name__} has no module of that name; its blocks are "
                            f"{', '.join(b.name for b in blocks)}")
        return next((b for b in blocks if b.name == layer), Block(layer, modules[layer]))
    sides = [min(a.shape[2:]) for a in activations]
    for block, side in reversed(list(zip(blocks, sides))):
        if side >= MIN_CAM_SIDE:
            return block
    return blocks[len(sides) - 1 - int(np.argmax(sides[::-1]))]


def visualize_image(model: nn.Module, blocks: list[Block], x: torch.Tensor, image: np.ndarray, name: str,
                    folder: Path, target: str, layer: str | None) -> tuple[str, list]:
    """Write folder/blockN.png and folder/gradcam.png for one preprocessed image; returns the model's verdict
    and the page blocks that show them."""
    activations, probs = capture(model, blocks, x)
    p_all = float(probs[0, 1])
    cls = {"pred": int(p_all >= 0.5), "all": 1, "hem": 0}[target]
    figures = []
    for i, (block, act) in enumerate(zip(blocks, activations), start=1):
        maps, channels = feature_maps(act)
        title = f"block {i} ({block.name}): {act.shape[1]} channels, {act.shape[2]} x {act.shape[3]}"
        path = plots.feature_grid(maps, channels, title, folder / f"block{i}.png")
        figures.append(Figure(f"{folder.name}/{path.name}", f"block {i}: {block.name}"))
    where = cam_block(model, blocks, activations, layer)
    heat = grad_cam(model, where, x.clone().requires_grad_(True), cls)
    from pytorch_grad_cam.utils.image import show_cam_on_image

    overlay = show_cam_on_image(image.astype(np.float32) / 255, heat, use_rgb=True)
    verdict = f"p(all) {plots.probability_text(p_all)}, predicted {plots.CLASS_NAMES[int(p_all >= 0.5)]}"
    what = f"Grad-CAM of '{plots.CLASS_NAMES[cls]}' at {where.name}"
    plots.gradcam_figure(image, heat, overlay, f"{name}: {verdict}; {what}", folder / "gradcam.png")
    return verdict, [Heading(f"{name}: {verdict}"), Figure(f"{folder.name}/gradcam.png", what), *figures]

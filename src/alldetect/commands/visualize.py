"""`alldetect visualize RUN IMAGE...`: feature maps and Grad-CAM of each image (how: alldetect.visualize)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from alldetect.atomic import check_writable, safe_name
from alldetect.data.images import preprocess
from alldetect.engine.loop import DeviceBatch, resolve_device
from alldetect.engine.rundir.files import RunDir
from alldetect.engine.rundir.find import find_fold_runs
from alldetect.errors import UserError
from alldetect.page import Page, Paragraph, to_html, to_markdown
from alldetect.visualize import MAX_CHANNELS, MIN_CAM_SIDE, check_images, conv_blocks, unique_stems, visualize_image

log = logging.getLogger("alldetect")


def visualize_command(run: str, images: list[str], out: str = "reports/visualize", device: str = "cpu",
                      target: str = "pred", layer: str | None = None) -> Path:
    """Feature-map grids and Grad-CAM of `images` through the model of `run`; returns the output folder."""
    if not images:
        raise UserError("name at least one image: alldetect visualize RUN IMAGE...")
    runs = find_fold_runs([run])
    if len(runs) > 1:
        log.info("%s holds %d fold runs: using %s (name runs/<arch>/fold<k> for another)", run, len(runs), runs[0])
    run_dir = runs[0]
    pictures = check_images(images)
    check_writable(out, "the output folder (--out)")
    state = RunDir(run_dir).load_best()
    model, size, crop = state.network(), state.meta.input_size, state.meta.crop
    dev = resolve_device(device)
    model = model.eval().to(dev)
    blocks = conv_blocks(model)
    batch = DeviceBatch(dev, channels_last=False, amp=False)  # the normalisation training and predict use
    arch = state.meta.config.arch
    folder = Path(out) / f"{safe_name(arch)}_{run_dir.name}"
    page = Page(f"{arch} ({run_dir}): feature maps and Grad-CAM")
    page.add(Paragraph(f"Model: `{state.path}` (epoch {state.meta.progress.epoch + 1}), input {size} x {size} "
                       f"after a {crop} px centre crop. Feature maps: the {MAX_CHANNELS} most active channels at the "
                       "end of each convolution block, each scaled to its own range. Grad-CAM: at "
                       + (f"`{layer}`." if layer else f"the last block whose map is at least {MIN_CAM_SIDE} x "
                          f"{MIN_CAM_SIDE}.")))
    for path, picture, stem in zip(images, pictures, unique_stems(images)):
        image = preprocess(picture, crop, size)
        x = batch.images(torch.from_numpy(image[None]))
        verdict, shown = visualize_image(model, blocks, x, image, Path(path).name, folder / stem, target, layer)
        page.add(*shown)
        print(f"{path}: {verdict}; wrote {folder / stem}/gradcam.png and {len(blocks)} feature-map grids")
    (folder / "index.html").write_text(to_html(page), encoding="utf-8")
    (folder / "README.md").write_text(to_markdown(page), encoding="utf-8")
    print(f"wrote {folder / 'index.html'}")
    return folder

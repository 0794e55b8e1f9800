"""Self-supervised pretraining on unlabelled cells: `alldetect pretrain ARCH FOLD`.

The study names "auto-encoders ... for weight matrix initialization" as future work; this does it the way the field
does now, with SimCLR (Chen et al. 2020): two augmented views of every image (a random resized crop, then the run's
own augmentation: flips, quarter turns, rotation, colour jitter, stain), the network's pooled features through a
small projection head, and the NT-Xent loss of pytorch-metric-learning, which pulls the two views of an image
together and pushes the other images of the batch away. No label is read. The encoder's weights (the network
without its classifier) go to pretrained/<arch>/<fold>/encoder.pth, which `pretrained_path=` takes:

  alldetect pretrain resnet18 fold0 input_size=96 epochs=10
  alldetect train resnet18 fold0 input_size=96 pretrained_path=pretrained/resnet18/fold0/encoder.pth

FOLD `fold<k>` pretrains on the images of every other fold of the fold file (the people fold k's scores are of
are never seen, not even unlabelled): the honest start for fold k. `all` pretrains on every image of the fold file
(and of `data.extra`), the scored people's included: transductive when those are then scored. The run is a real
training run (engine/trainer.py with no evaluations: progress bars, W&B, last.pt every epoch, resume=true, SIGTERM
safety), kept in its own folder so that `report` and `ensemble` never mistake it for a classifier.
"""

from __future__ import annotations

import random
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import get_worker_info

from alldetect.atomic import atomic_path
from alldetect.config import Config
from alldetect.data.dataset import CellDataset, EpochSampler, make_loader
from alldetect.data.extra import extra_rows
from alldetect.data.folds import FoldFile
from alldetect.data.transforms import Augment, sample_seed
from alldetect.engine.accel import compiled
from alldetect.engine.distributed import Dist
from alldetect.engine.fit import FULL, FitResult, Task, fit_fold
from alldetect.engine.folddata import FoldData, resolve_border, shared_cache
from alldetect.engine.loop import DeviceBatch
from alldetect.engine.setup import Model
from alldetect.errors import UserError
from alldetect.models import create_model

PRETRAIN_DIR = Path("pretrained")  # pretrained/<arch>/<fold>/: beside runs/, never inside it
ENCODER_FILE = "encoder.pth"
PROJECTION = (512, 128)  # the projection head's hidden and output widths (SimCLR's shape)
CROP_SCALE = (0.35, 1.0)  # share of the image a view's random resized crop keeps (cells fill the middle)
TEMPERATURE = 0.1


class Contrastive(nn.Module):
    """The encoder (the network with its classifier removed) and SimCLR's projection head."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        hidden, out = PROJECTION
        features = int(encoder.num_features)  # type: ignore[arg-type]  # timm: the pooled features' width
        self.head = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def check_pretrainable(arch: str) -> None:
    if arch in ("proposed", "alexnet"):
        raise UserError(f"pretrain builds encoders that pretrained_path= loads, which {arch} does not take: "
                        "pretrain a timm network (e.g. resnet18, efficientnet_lite0, resnet50)")


def contrastive_model(cfg: Config, size: int) -> Contrastive:
    check_pretrainable(cfg.arch)
    torch.manual_seed(cfg.seed)
    network = create_model(cfg.arch, num_classes=2, dropout=0.0, pretrained=cfg.pretrained,
                           pretrained_path=cfg.pretrained_path, input_size=size)
    network.reset_classifier(0)  # type: ignore[operator]  # pooled features out (timm)
    return Contrastive(network)


class NTXent(nn.Module):
    """The loss of a batch of views, whose targets are each view's image index (the two views of an image share
    it: they are the positive pair)."""

    def __init__(self, temperature: float = TEMPERATURE):
        super().__init__()
        from pytorch_metric_learning.losses import NTXentLoss

        self.loss = NTXentLoss(temperature=temperature)

    def forward(self, embeddings: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return self.loss(embeddings.float(), images)


class TwoViews(CellDataset):
    """Each image twice, differently augmented: a batch of n images is 2n views, targets the images' indices."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.resized_crop = A.Compose([A.RandomResizedCrop(size=(self.size, self.size), scale=CROP_SCALE)])

    def view(self, image: np.ndarray, seed: int) -> np.ndarray:
        self.resized_crop.set_random_state(np.random.default_rng(seed), random.Random(seed))
        cropped = self.resized_crop(image=image)["image"]
        return self.transform(cropped, seed + 1) if self.transform is not None else np.ascontiguousarray(cropped)

    def __getitems__(self, items: list[int]):
        n = len(items)
        images = torch.empty((2 * n, self.size, self.size, 3), dtype=torch.uint8)
        if get_worker_info() is not None:
            images = images.share_memory_()
        buffer, rows = images.numpy(), np.empty(n, dtype=np.int64)
        for j, item in enumerate(items):
            epoch, rows[j] = divmod(int(item), len(self.paths))
            image = self.load(int(rows[j]))
            for v in (0, 1):
                buffer[v * n + j] = self.view(image, sample_seed(self.seed, epoch, 2 * int(rows[j]) + v))
        both = torch.from_numpy(np.concatenate([rows, rows]))
        return images, both, both


def pretrain_data(cfg: Config, folds: FoldFile, fold: int | None, size: int, device: torch.device,
                  d: Dist) -> FoldData:
    """The images a pretraining run sees: every fold but `fold` (None: every image), labels never read."""
    if d.enabled:
        raise UserError("pretrain runs on one process: leave out --gpus")
    rows = folds.table if fold is None else folds.table[folds.table["fold"] != fold]
    rows = rows.reset_index(drop=True)
    extra = extra_rows(cfg.data.extra, folds.table, folds.data_root) if cfg.data.extra else None
    if extra is not None:
        rows = pd.concat([rows, extra], ignore_index=True)
    cache = None
    if cfg.data.cache:  # the same cache as the classification runs of this data and size
        paths = folds.table["path"].tolist() + (extra["path"].tolist() if extra is not None else [])
        cache = shared_cache(cfg, folds, paths, size, d)
    if len(rows) < 2 * max(2, cfg.batch_size // 4):
        raise UserError(f"pretrain{'' if fold is None else f' fold{fold}'} has {len(rows)} image(s): contrastive "
                        "learning needs a batch of several images; give it more data")
    aug = resolve_border(cfg, folds, rows)
    source = cache.source(rows["path"]) if cache is not None else None
    dataset = TwoViews(folds.data_root, rows["path"], np.arange(len(rows)), cfg.data.crop, size, Augment(aug),
                       cfg.seed, source)
    sampler = EpochSampler(len(dataset), cfg.seed, True, None, 0, 1)
    loader = make_loader(dataset, cfg.batch_size, sampler, cfg.data.num_workers, device.type == "cuda",
                         drop_last=True)
    return FoldData(loader, sampler, None, None, None, cfg.batch_size, len(rows), aug)


def write_encoder(model: Contrastive, path: Path) -> Path:
    """encoder.pth: the encoder's state dict, as timm (pretrained_path=) loads it."""
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.encoder.state_dict().items()}, tmp)
    return path


def _model(cfg: Config, size: int, device: torch.device, d: Dist, dev: DeviceBatch) -> Model:
    module = contrastive_model(cfg, size).to(device)
    if dev.channels_last:
        module = module.to(memory_format=torch.channels_last)
    forward = compiled(module, cfg.compile_mode, device) if cfg.compile else module  # CUDA only
    return Model(module, forward, None, use_ema=False)


PRETRAIN = Task(data=pretrain_data, model=_model, loss=NTXent)
# What a pretraining run never does, whatever the config says: it has no labels to mix, weigh or choose on.
FORCED = ["select=last", "ema=false", "mixup=0", "cutmix=0", "class_balance=none", "augment_on=cpu",
          "freeze_epochs=0", "label_smoothing=0"]


def pretrain_dir(cfg: Config, fold: int | None) -> Path:
    return PRETRAIN_DIR / cfg.arch / ("all" if fold is FULL else f"fold{fold}")


def pretrain_fold(cfg: Config, fold: int | None, folds: FoldFile) -> tuple[FitResult, Path]:
    """Pretrain on every fold but `fold` (FULL: every image) into pretrained/<arch>/<fold>/; returns the run's
    result and its encoder.pth."""
    run = pretrain_dir(cfg, fold)
    result = fit_fold(cfg, fold, folds, run, wandb_name=f"{cfg.arch}-pretrain-{run.name}", job_type="pretrain",
                      task=PRETRAIN)
    from alldetect.engine.rundir.files import load_checkpoint

    model = contrastive_model(cfg, cfg.resolved_input_size)
    model.load_state_dict(load_checkpoint(run / "best.pt").model)
    return result, write_encoder(model, run / ENCODER_FILE)

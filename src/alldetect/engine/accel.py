"""How a network runs on a GPU: torch.compile (its compiled kernels kept between runs), CUDA graphs through
compile's `reduce-overhead` mode, and fused optimiser steps. Compiling applies on CUDA only: on the CPU a network
runs eager, exactly as without this module. Fused optimiser steps apply on both (bench/optimizer.py).

Each architecture's config records what measured fastest for it (bench/gpu.sh; the README's Performance section):
`compile`, `compile_mode`, `channels_last` and `amp`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import get_args

import torch
from torch import nn

from alldetect.config import Config

log = logging.getLogger("alldetect")

COMPILE_MODES: tuple[str, ...] = get_args(Config.model_fields["compile_mode"].annotation)  # as the config allows
FUSED_OPTIMIZERS = ("adam", "adamw", "sgd", "momentum")  # torch's own Adam/AdamW/SGD have fused CUDA and CPU kernels


def compile_cache_dir() -> Path:
    """Where Inductor keeps compiled graphs and kernels, so that a second run (another fold, a resume, predict)
    loads them instead of compiling again: $TORCHINDUCTOR_CACHE_DIR, else ~/.cache/alldetect/torchinductor (a
    folder that outlives /tmp, where torch would put it)."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "alldetect" / "torchinductor"


def use_compile_cache() -> Path:
    """Point Inductor's on-disk caches (FX graphs and AOT autograd, both on by default in torch >= 2.5) at
    compile_cache_dir() before the first compile."""
    folder = compile_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return folder


def compiled(module: nn.Module, mode: str = "default", device: torch.device | None = None,
             backend: str = "inductor") -> nn.Module:
    """`module` under torch.compile with static shapes (each batch size its own graph: the training loader drops
    its last, smaller batch and inference pads it, so one graph serves a whole run). On a CPU device it is
    returned as it is: compiling on the CPU costs minutes on a small machine and gains little there."""
    if device is not None and device.type != "cuda":
        return module
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode={mode}: choose one of {', '.join(COMPILE_MODES)}")
    if backend == "inductor":
        use_compile_cache()
    return torch.compile(module, mode=mode, dynamic=False, backend=backend)  # type: ignore[return-value]


def fused_args(optimizer: str, device: torch.device) -> dict:
    """`fused=True` for torch's Adam, AdamW and SGD on a GPU or the CPU: one kernel for the whole update instead of
    one per tensor group (GPU) or a dozen passes over every weight (CPU: AdamW's step several times faster, see
    bench/optimizer.py). Same arithmetic as the default implementation up to rounding; the optimiser's state_dict
    is the same, so a run resumes either way (and a run started unfused goes on unfused: the setting is restored
    with the state)."""
    return {"fused": True} if device.type in ("cuda", "cpu") and optimizer in FUSED_OPTIMIZERS else {}


def pad_batch(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """A short (last) batch padded with zero images to `size`, so that a compiled network (or its CUDA graph)
    sees the batch size it was built for. Inference only: in eval mode every image's output is its own, so the
    padding changes nothing but is cut off again by the caller."""
    if size is None or len(x) >= size:
        return x
    layout = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format
    return torch.cat([x, x.new_zeros((size - len(x), *x.shape[1:]))]).contiguous(memory_format=layout)

"""Inference speed of a run's architecture, measured the same way for every model on the report's page."""

from __future__ import annotations

import time

import torch

from alldetect.config import Config
from alldetect.models import model_from_config

SPEED_BATCH, SPEED_STEPS = 8, 5  # images per timed batch, timed batches


def inference_speed(cfg: Config, device: torch.device) -> float:
    """Images/s of the run's architecture at its input size: eval mode, fp32, a batch of SPEED_BATCH random
    images, the fastest of SPEED_STEPS timed batches after one warm-up (the weights do not change the time).
    On the CPU on one thread: with several, a machine shared with other jobs gave anything from 3 to 170
    images/s for the same model (threads waiting for each other); one thread gives the same number each time."""
    size = cfg.resolved_input_size
    torch.manual_seed(0)
    model = model_from_config(cfg).eval().to(device)
    x = torch.randn(SPEED_BATCH, 3, size, size, device=device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    times = []
    try:
        with torch.inference_mode():
            for step in range(SPEED_STEPS + 1):
                start = time.perf_counter()
                model(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if step:
                    times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return SPEED_BATCH / min(times)

"""Training and inference images/s of each architecture at its input size and its config's batch size,
optimised settings (channels_last, and AMP in bf16 on CUDA; optionally torch.compile) against plain fp32 NCHW,
side by side on the same synthetic batch."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from alldetect.config import load_config
from alldetect.engine.loop import logits_of, resolve_device
from alldetect.models import REPORT_ARCHS, create_model, default_input_size


def _timed(fn, steps: int, warmup: int, cuda: bool) -> float:
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def measure(arch: str, batch: int, device: torch.device, optimised: bool, steps: int, warmup: int,
            compile_model: bool = False) -> tuple[float, float]:
    """(train images/s, inference images/s) for one setting."""
    size = default_input_size(arch)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = create_model(arch, input_size=size).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 2, (batch,), device=device)
    if optimised:  # on the CPU channels_last is the only change that applies (no AMP there)
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model) if (compile_model and optimised and cuda) else model
    amp = optimised and cuda
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train_step():
        with torch.autocast("cuda", dtype=dtype, enabled=amp):
            loss = torch.nn.functional.cross_entropy(logits_of(forward(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.inference_mode()
    def infer_step():
        with torch.autocast("cuda", dtype=dtype, enabled=amp):
            forward(x)

    model.train()
    train = batch / _timed(train_step, steps, warmup, cuda)
    model.eval()
    infer = batch / _timed(infer_step, steps, warmup, cuda)
    return train, infer


def run(archs: list[str] | None = None, device: str = "auto", steps: int | None = None, warmup: int | None = None,
        max_batch: int | None = None, compile_model: bool = False) -> pd.DataFrame:
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    torch.backends.cudnn.benchmark = True  # as training does: both settings get their fastest kernels
    steps = steps or (20 if cuda else 2)
    warmup = warmup or (5 if cuda else 1)
    max_batch = max_batch or (10_000 if cuda else 8)  # full config batches take minutes per step on 2 cores
    rows = []
    for arch in archs or list(REPORT_ARCHS):
        batch = min(load_config(arch).batch_size, max_batch)
        plain = measure(arch, batch, dev, False, steps, warmup)
        fast = measure(arch, batch, dev, True, steps, warmup, compile_model)
        rows.append({"arch": arch, "input": default_input_size(arch), "batch": batch,
                     "train_plain": plain[0], "train_opt": fast[0], "train_x": fast[0] / plain[0],
                     "infer_plain": plain[1], "infer_opt": fast[1], "infer_x": fast[1] / plain[1]})
        if cuda:
            torch.cuda.empty_cache()
    table = pd.DataFrame(rows)
    name = torch.cuda.get_device_name(dev) if cuda else "CPU"
    opt = "channels_last + AMP bf16" + (" + torch.compile" if compile_model else "") if cuda else "channels_last"
    table.attrs["setup"] = f"device {name}; optimised = {opt}; plain = fp32 NCHW; {steps} timed steps after {warmup}"
    return table


def report(table: pd.DataFrame) -> str:
    fmt = {c: "{:.1f}".format for c in ("train_plain", "train_opt", "infer_plain", "infer_opt")}
    fmt.update({c: "{:.2f}x".format for c in ("train_x", "infer_x")})
    geo = float(np.exp(np.log(table["train_x"]).mean()))
    return "\n".join([f"models (images/s): {table.attrs['setup']}", table.to_string(index=False, formatters=fmt),
                      f"speedup: {geo:.2f}x  (geometric mean of the training speed-ups)"])

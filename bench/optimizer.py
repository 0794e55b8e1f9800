"""Fused against unfused optimiser steps on this machine's CPU (or GPU), side by side in one run.

torch's Adam, AdamW and SGD have a fused kernel for the CPU as for CUDA: one pass over the weights instead of a
dozen. alldetect asks for it on both (engine/accel.py::fused_args). For each network: the optimiser's step alone
and a whole training step (forward, backward, step) at the given batch, unfused and fused, alternated so that
both see the same machine. Ends with the headline `speedup: <ratio>x` (whole training step, the geometric mean
over the networks).

    .venv/bin/python bench/optimizer.py [--archs proposed:64,resnet18:96,tf_efficientnet_lite0:96] [--batch 32]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from alldetect.config import load_config
from alldetect.engine.optim import create_optimizer
from alldetect.models import model_from_config


def _timed(fn, repeats: int) -> float:
    fn()  # the first call allocates the optimiser's state
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _unfused(cfg, model):
    """The optimiser as alldetect built it on the CPU before: the same call without fused_args' `fused=True`."""
    import alldetect.engine.optim as optim

    saved, optim.fused_args = optim.fused_args, lambda name, device: {}
    try:
        return create_optimizer(cfg, model)
    finally:
        optim.fused_args = saved


def measure(arch: str, size: int, batch: int, optimizer: str, repeats: int, rounds: int) -> tuple[dict[str, float], int]:
    """Median seconds of each timing, and the network's number of weights."""
    cfg = load_config(arch, [f"input_size={size}", f"optimizer={optimizer}"])
    base = model_from_config(cfg)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 2, (batch,))
    times: dict[str, list[float]] = {"step unfused": [], "step fused": [], "train unfused": [], "train fused": []}
    for _ in range(rounds):
        for fused in (False, True):
            model = copy.deepcopy(base).train()
            opt = create_optimizer(cfg, model) if fused else _unfused(cfg, model)
            for p in model.parameters():
                p.grad = torch.randn_like(p) * 1e-3
            tag = "fused" if fused else "unfused"
            times[f"step {tag}"].append(_timed(opt.step, repeats))

            def train_step(model=model, opt=opt):
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            times[f"train {tag}"].append(_timed(train_step, max(1, repeats // 4)))
    return {k: statistics.median(v) for k, v in times.items()}, sum(p.numel() for p in base.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="proposed:64,resnet18:96,tf_efficientnet_lite0:96",
                    help="ARCH:SIZE,... (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--optimizer", default="adamw", help="adamw (the defaults), adam or sgd")
    ap.add_argument("--repeats", type=int, default=8, help="optimiser steps per timing (a quarter for training)")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of unfused and fused; the median is kept")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}, {args.optimizer}")
    print(f"{'network':>28} {'params':>7} {'step unfused':>13} {'fused':>8} {'ratio':>6} "
          f"{'train step unfused':>19} {'fused':>8} {'ratio':>6}")
    ratios = []
    for spec in args.archs.split(","):
        arch, size = spec.split(":")
        t, params = measure(arch, int(size), args.batch, args.optimizer, args.repeats, args.rounds)
        step, train = t["step unfused"] / t["step fused"], t["train unfused"] / t["train fused"]
        ratios.append(train)
        print(f"{arch + ' ' + size + ' px':>28} {params / 1e6:6.1f}M {t['step unfused'] * 1e3:10.1f} ms "
              f"{t['step fused'] * 1e3:5.1f} ms {step:5.2f}x {t['train unfused'] * 1e3:16.0f} ms "
              f"{t['train fused'] * 1e3:5.0f} ms {train:5.2f}x", flush=True)
    print(f"speedup: {statistics.geometric_mean(ratios):.2f}x")


if __name__ == "__main__":
    main()

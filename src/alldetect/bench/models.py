"""Training and inference images/s of each architecture at its input size, plain fp32 NCHW eager against the
optimised settings, side by side on the same synthetic batch, at two batch sizes: the config's, and one that fills
the card.

Settings (engine/accel.py, engine/loop.py):
  plain     fp32, NCHW, eager, AdamW (torch's default multi-tensor step)
  bf16      AMP in bf16, NCHW, eager, fused AdamW
  bf16_cl   the same in channels_last
  compile   bf16, the faster of the two layouts, torch.compile (mode default), fused AdamW
  graphs    the same with mode reduce-overhead (CUDA graphs)
The optimised number of a row is its fastest setting. On the CPU only plain, bf16_cl's layout (fp32: no AMP there)
are run; compile and CUDA graphs apply to CUDA only.

The batch that fills the card: from the config's batch, doubled while plain training gained at least FILL_GAIN more
images/s and fitted in memory, up to FILL_CAP. Compilation is the slow part of this benchmark (tens of seconds a
graph), so the compiled settings run only while `budget` seconds are left; what was not measured shows as NaN.

Verdict per architecture, against issue 24's goals: training optimised >= 1.5x plain at the filling batch and >= 1.0x
at the config's; inference >= 2x; and which settings its config should hold: compile where the time it saves over
a typical run (RUN_IMAGES training images) exceeds the compilation's cost.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from alldetect.config import load_config
from alldetect.engine.accel import compiled
from alldetect.engine.loop import logits_of, resolve_device
from alldetect.models import REPORT_ARCHS, create_model, default_input_size

FILL_GAIN, FILL_CAP = 1.10, 1024
RUN_IMAGES = 255_000  # a C-NMC fold run: ~8,500 training images x 30 epochs
TARGET_SECONDS = 0.4  # each timing: as many steps as fit in about this long (at least 3)
GOALS = {"fill": 1.5, "config": 1.0, "infer": 2.0}


@dataclass(frozen=True)
class Setting:
    name: str
    amp: bool
    channels_last: bool
    compile_mode: str | None  # None: eager
    fused: bool


PLAIN = Setting("plain", False, False, None, False)
EAGER = (Setting("bf16", True, False, None, True), Setting("bf16_cl", True, True, None, True))


def _compiled_settings(channels_last: bool) -> tuple[Setting, Setting]:
    return (Setting("compile", True, channels_last, "default", True),
            Setting("graphs", True, channels_last, "reduce-overhead", True))


def _clock(fn, calls: int, cuda: bool) -> float:
    """Seconds that `calls` calls of fn take, the GPU's queued work included."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _timed(fn, cuda: bool, warmup: int = 3) -> tuple[float, float]:
    """(seconds a step, seconds the first call took). Steps: as many as fit in TARGET_SECONDS, at least 3."""
    first = _clock(fn, 1, cuda)
    _clock(fn, warmup - 1, cuda)
    probe = _clock(fn, 1, cuda)
    steps = max(3, min(30, math.ceil(TARGET_SECONDS / max(probe, 1e-6))))
    return _clock(fn, steps, cuda) / steps, first


def measure(arch: str, batch: int, device: torch.device, s: Setting, train: bool = True,
            infer: bool = True) -> dict:
    """images/s of one setting: {'train', 'infer', 'compile_s'} (compile_s: the first calls' extra seconds)."""
    size = default_input_size(arch)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = create_model(arch, input_size=size).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 2, (batch,), device=device)
    if s.channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    forward = compiled(model, s.compile_mode, device) if s.compile_mode else model  # eager on a CPU
    amp = s.amp and cuda
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if s.fused and cuda else None)
    graphs = s.compile_mode == "reduce-overhead" and cuda

    def train_step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=dtype, enabled=amp):
            loss = torch.nn.functional.cross_entropy(logits_of(forward(x)), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.inference_mode()
    def infer_step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=dtype, enabled=amp):
            forward(x)

    out = {"train": math.nan, "infer": math.nan, "compile_s": 0.0}
    if train:
        model.train()
        step, first = _timed(train_step, cuda)
        out["train"], out["compile_s"] = batch / step, max(first - step, 0.0)
    if infer:
        model.eval()
        step, first = _timed(infer_step, cuda)
        out["infer"] = batch / step
        out["compile_s"] += max(first - step, 0.0)
    if cuda:  # progress, so that a run stopped at its time limit still says what it measured
        print(f"[bench] {arch} batch {batch} {s.name}: train {out['train']:.1f}, infer {out['infer']:.1f} images/s, "
              f"first calls {out['compile_s']:.1f} s over a step", flush=True)
    return out  # the model, batch and optimiser go with this frame; run() empties the CUDA cache between settings


def fill_batch(arch: str, start: int, device: torch.device, cap: int) -> int:
    """The batch that fills the card (see the module's docstring)."""
    batch, best = start, measure(arch, start, device, PLAIN, infer=False)["train"]
    while batch * 2 <= cap:
        try:
            bigger = measure(arch, batch * 2, device, PLAIN, infer=False)["train"]
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        if bigger < FILL_GAIN * best:
            break
        batch, best = batch * 2, bigger
    return batch


def run(archs: list[str] | None = None, device: str = "auto", max_batch: int | None = None,
        budget: float = 240.0, compile_model: bool = True) -> pd.DataFrame:
    """Eager settings first for every architecture; then the compiled ones, most telling first (CUDA graphs at
    the config's small batch, compile at the filling batch, for every architecture; then the other two), started
    while the compiled part has run less than `budget` seconds (on an H100 the eager part of the five architectures
    took 130-300 s; one compiled setting 55 s for ResNet50)."""
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    torch.backends.cudnn.benchmark = True  # as training does: every setting gets its fastest kernels
    cap = max_batch or (FILL_CAP if cuda else 8)  # full config batches take minutes per step on 2 cores
    cells: dict[tuple[str, str], tuple[int, dict]] = {}
    for arch in archs or list(REPORT_ARCHS):
        config_batch = min(load_config(arch).batch_size, cap)
        fill = fill_batch(arch, config_batch, dev, cap) if cuda else config_batch
        for which, batch in (("config", config_batch), ("fill", fill)):
            if which == "fill" and fill == config_batch:  # the config's batch fills the card already
                cells[arch, "fill"] = cells[arch, "config"]
                continue
            results = {"plain": measure(arch, batch, dev, PLAIN)}
            for s in EAGER if cuda else (Setting("cl", False, True, None, False),):
                results[s.name] = measure(arch, batch, dev, s)
                _free(cuda)
            cells[arch, which] = (batch, results)
    if cuda and compile_model:
        first = [(a, w, "graphs" if w == "config" else "compile") for a, w in cells]
        order = first + [(a, w, "compile" if w == "config" else "graphs") for a, w in cells]
        done: set[tuple[int, str, str]] = set()
        started, skipped = time.perf_counter(), []
        for arch, which, name in order:
            batch, results = cells[arch, which]
            if (id(results), arch, name) in done:
                continue
            if time.perf_counter() - started >= budget:
                skipped.append(f"{arch} {name} at batch {batch}")
                continue
            done.add((id(results), arch, name))
            layout = results["bf16_cl"]["train"] >= results["bf16"]["train"]
            setting = {s.name: s for s in _compiled_settings(layout)}[name]
            torch._dynamo.reset()  # each setting compiles from scratch (the on-disk cache may still serve it)
            try:
                results[name] = measure(arch, batch, dev, setting)
            except Exception as e:  # a setting that does not compile is a result too, not the end of the bench
                print(f"[bench] {arch} batch {batch} {name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            _free(cuda)
        if skipped:
            print(f"[bench] not measured (--budget {budget:g} s spent): {', '.join(skipped)}")
    rows = [_row(arch, which, batch, results) for (arch, which), (batch, results) in cells.items()]
    table = pd.DataFrame(rows)
    name = torch.cuda.get_device_name(dev) if cuda else "CPU"
    tried = ", ".join(c for c in ("bf16", "bf16_cl", "compile", "graphs") if f"{c}_train" in table)
    table.attrs["setup"] = (f"device {name}, torch {torch.__version__}; plain = fp32 NCHW eager; optimised = the "
                            f"fastest of {tried}" if cuda else f"device {name}; plain = fp32 NCHW; optimised = channels_last")
    return table


def _free(cuda: bool) -> None:
    if cuda:
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def _row(arch: str, which: str, batch: int, results: dict) -> dict:
    row = {"arch": arch, "input": default_input_size(arch), "batch_is": which, "batch": batch}
    for name, r in results.items():
        row[f"{name}_train"], row[f"{name}_infer"] = r["train"], r["infer"]
        if name in ("compile", "graphs"):
            row[f"{name}_s"] = r["compile_s"]
    for task in ("train", "infer"):
        rates = {n: r[task] for n, r in results.items() if n != "plain" and not math.isnan(r[task])}
        best = max(rates, key=lambda n: rates[n]) if rates else "plain"
        row[f"{task}_best"], row[f"{task}_x"] = best, rates.get(best, math.nan) / results["plain"][task]
    return row


def verdicts(table: pd.DataFrame) -> list[str]:
    """One line per architecture: the goals met or missed, and the settings its config should hold."""
    lines = []
    for arch, rows in table.groupby("arch", sort=False):
        cfg = rows[rows.batch_is == "config"].iloc[0]
        fill = rows[rows.batch_is == "fill"].iloc[0]
        marks = [(f"train {fill.train_x:.2f}x at batch {fill.batch}", fill.train_x >= GOALS["fill"], "1.5x"),
                 (f"{cfg.train_x:.2f}x at the config's {cfg.batch}", cfg.train_x >= GOALS["config"], "1.0x"),
                 (f"inference {fill.infer_x:.2f}x", fill.infer_x >= GOALS["infer"], "2x")]
        said = ", ".join(f"{text} ({'ok' if ok else 'MISSED'}, goal {goal})" for text, ok, goal in marks)
        lines.append(f"verdict {arch}: {said}; config: {_settings(cfg)}")
    return lines


def _settings(row: pd.Series) -> str:
    """What the arch's config should say, from its config-batch row: the fastest eager layout, plus compile when
    the seconds it saves over RUN_IMAGES training images exceed its compilation time."""
    eager = "bf16_cl" if row.get("bf16_cl_train", math.nan) >= row.get("bf16_train", math.nan) else "bf16"
    eager_rate = row.get(f"{eager}_train", math.nan)
    say = f"channels_last={'true' if eager == 'bf16_cl' else 'false'} amp=true"
    if math.isnan(eager_rate):
        return "channels_last=true amp=true (no GPU: not measured)"
    options = []
    for mode, name in (("default", "compile"), ("reduce-overhead", "graphs")):
        rate = row.get(f"{name}_train", math.nan)
        if not math.isnan(rate) and rate > eager_rate:
            saved = RUN_IMAGES / eager_rate - RUN_IMAGES / rate
            options.append((saved - row.get(f"{name}_s", 0.0), mode, saved, row.get(f"{name}_s", 0.0)))
    best = max(options, default=None)
    if best is None or best[0] <= 0:
        why = f" (compile saves {best[2]:.0f} s a run, costs {best[3]:.0f} s)" if best else ""
        return say + " compile=false" + why
    return say + f" compile=true compile_mode={best[1]} (saves {best[2]:.0f} s a run, costs {best[3]:.0f} s)"


def report(table: pd.DataFrame) -> str:
    cols = [c for c in table.columns if c.endswith(("_train", "_infer", "_s"))]
    fmt = {c: "{:.1f}".format for c in cols}
    fmt.update({c: "{:.2f}x".format for c in ("train_x", "infer_x")})
    geo = float(np.exp(np.log(table["train_x"]).mean()))
    lines = [f"models (images/s): {table.attrs['setup']}", table.to_string(index=False, formatters=fmt)]
    if "bf16_train" in table:
        lines += verdicts(table)
    lines.append(f"speedup: {geo:.2f}x  (geometric mean of the training speed-ups)")
    return "\n".join(lines)

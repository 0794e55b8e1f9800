"""`alldetect bench KIND`: the speed benchmarks (what each measures: alldetect.bench)."""

from __future__ import annotations

from pathlib import Path


def bench_command(kind: str, data: str | None = None, images: int = 320, workers: int = 2, archs=None,
                  budget: float = 240.0, max_batch: int | None = None, compile_model: bool = True,
                  device: str = "auto", out: str | None = None, cache_dir: str = "data/cache") -> str:
    if kind == "pipeline":
        from alldetect.bench import pipeline
        from alldetect.data.prepare import ensure_demo_data

        text = pipeline.report(pipeline.run(data or ensure_demo_data(), images=images, workers=workers,
                                            device=device, cache_dir=cache_dir))
    else:
        from alldetect.bench import models

        text = models.report(models.run(archs or None, device=device, max_batch=max_batch, budget=budget,
                                        compile_model=compile_model))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8") as f:
            f.write(text + "\n\n")
    return text

"""`alldetect models`: the architectures, their input sizes and sizes in parameters."""

from __future__ import annotations

import pandas as pd
import torch

from alldetect.models.factory import count_parameters, create_model
from alldetect.models.names import REPORT_ARCHS, default_input_size


def models_table(names: list[str] | None = None) -> pd.DataFrame:
    rows = []
    for name in names or list(REPORT_ARCHS):
        with torch.device("meta"):  # shapes only: no memory, no time spent initialising weights
            model = create_model(name)
        trainable, stats = count_parameters(model)
        rows.append({"name": name, "input_size": default_input_size(name), "trainable_params": trainable,
                     "bn_running_stats": stats, "source": _source(name)})
    return pd.DataFrame(rows)


def _source(name: str) -> str:
    return {"proposed": "the report (alldetect.models.proposed)", "alexnet": "torchvision"}.get(name, "timm")

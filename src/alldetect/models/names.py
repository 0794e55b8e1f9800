"""Architecture names and their natural input sizes: the report's five and any timm model. Light (timm is
imported only to look a name up), so the config can ask for a default input size without building anything."""

from __future__ import annotations

import difflib

from alldetect.errors import UserError

# The report's five and their natural input sizes (the report resized all of them to fit its GPU).
REPORT_ARCHS = {"proposed": 300, "alexnet": 224, "vgg16": 224, "resnet50": 224, "inception_v3": 299}
MIN_INPUT = {"inception_v3": 75, "alexnet": 63}


def default_input_size(name: str) -> int:
    if name in REPORT_ARCHS:
        return REPORT_ARCHS[name]
    import timm

    check_timm_name(name)
    cfg = timm.get_pretrained_cfg(name)
    return int(cfg.input_size[-1]) if cfg is not None else 224


def check_timm_name(name: str) -> None:
    import timm

    if name not in REPORT_ARCHS and not timm.is_model(name):
        close = difflib.get_close_matches(name, list(dict.fromkeys([*REPORT_ARCHS, *timm.list_models()])), n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UserError(f"unknown architecture '{name}'. Use one of {', '.join(REPORT_ARCHS)} or any timm model "
                        f"name (see `alldetect models`).{hint}")

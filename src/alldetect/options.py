"""`key=value` options of `predict` and `ensemble`: declared once here (default, parser, how the values are written,
what they mean), told apart from the run folders they follow, checked against what each command accepts with errors
that list the valid keys and values, and listed in the CLI's help from the same declarations. A new option is one
entry of PREDICT_OPTIONS or ENSEMBLE_OPTIONS. This module imports nothing heavy: the CLI reads it to build --help."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alldetect.errors import UserError

OPTION_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*)=(.*)$")


def split_options(tokens: list[str]) -> tuple[list[str], dict[str, str]]:
    """['runs/proposed', 'tta=d8'] -> (['runs/proposed'], {'tta': 'd8'}). One grammar, as `train`'s overrides:
    a token is an option when it starts with a name (letters, digits, _ and .) and '='; anything else is a path
    (a folder whose name has '=' in it is named with its folder: ./a=b). A later key=value wins."""
    paths, options = [], {}
    for token in tokens:
        m = OPTION_RE.match(token)
        if m is None:
            paths.append(token)
            continue
        key, value = m.groups()
        options[key] = value
    looks_like = [f"{k}={v}" for k, v in options.items() if Path(f"{k}={v}").exists()]
    if not paths and looks_like:  # the folder was meant: there is nothing else to run on
        raise UserError(f"{looks_like[0]} is read as the option {looks_like[0].split('=')[0]}=; to name the folder "
                        f"{looks_like[0]}, write ./{looks_like[0]}")
    return paths, options


@dataclass(frozen=True)
class Option:
    default: Any
    parse: Callable[[str], Any]  # raises ValueError with a message that says what is allowed
    values: str  # how the values are written in the help, e.g. none|flip|d8
    meaning: str = ""


def describe(spec: dict[str, Option]) -> str:
    """The options as --help lists them: key=values (default; what they mean), ..."""
    def one(key: str, o: Option) -> str:
        default = str(o.default).lower() if isinstance(o.default, bool) else o.default
        return f"{key}={o.values} (default {default}{'; ' + o.meaning if o.meaning else ''})"

    return ", ".join(one(k, o) for k, o in spec.items())


def parse_options(options: dict[str, str], spec: dict[str, Option], command: str) -> dict[str, Any]:
    """The command's options: each given one parsed by its declaration, the others at their defaults."""
    unknown = sorted(set(options) - set(spec))
    if unknown:
        valid = ", ".join(f"{k}=" for k in spec)
        token = f"{unknown[0]}={options[unknown[0]]}"
        hint = f" (to name the folder {token}, write ./{token})" if Path(token).exists() else ""
        raise UserError(f"unknown option {unknown[0]}= for `alldetect {command}`{hint}. Valid options: {valid}")
    out = {key: o.default for key, o in spec.items()}
    for key, raw in options.items():
        try:
            out[key] = spec[key].parse(raw)
        except ValueError as e:
            raise UserError(f"{key}={raw}: {e}") from None
    return out


def choice(*values: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in values:
            raise ValueError(f"choose one of {', '.join(values)}")
        return raw

    return parse


def at_least(minimum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"not a whole number; use an integer >= {minimum}") from None
        if value < minimum:
            raise ValueError(f"must be at least {minimum}")
        return value

    return parse


def text(raw: str) -> str:
    if not raw:
        raise ValueError("empty value")
    return raw


def boolean(raw: str) -> bool:
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(raw.lower())
    if value is None:
        raise ValueError("use true or false")
    return value


def _word_or_share(raw: str, words: tuple[str, ...], otherwise: str, outside: str) -> str | float:
    """One of `words`, or a number strictly between 0 and 1."""
    if raw in words:
        return raw
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(otherwise) from None
    if not 0 < value < 1:
        raise ValueError(outside)
    return value


def parse_threshold(raw: str) -> float | str:
    return _word_or_share(raw, ("oof",), "use a number between 0 and 1 (e.g. 0.5), or oof to choose it on "
                          "out-of-fold predictions", "the threshold must lie strictly between 0 and 1")


PRIOR_METHODS = ("em", "bbse")


def parse_prior(raw: str) -> str | float:
    """`prior=` of `alldetect ensemble`: none, em, bbse, or the known share of `all` in (0, 1)."""
    return _word_or_share(raw, ("none", *PRIOR_METHODS), "use em or bbse (estimate the test images' share of `all` "
                          "from their probabilities), a known share of `all` strictly between 0 and 1 (e.g. 0.5), "
                          "or none", "a known prior is the test images' share of `all`: a number strictly between 0 "
                          "and 1")


# ------------------------------------------------------------------ the commands' options

TTA_VIEWS = {"none": 1, "flip": 2, "d8": 8, "rot8": 8, "rot16": 16}  # test-time augmentation: views per image
TTA_MODES = tuple(TTA_VIEWS)
WEIGHTS = ("equal", "oof", "greedy", "stack")
AVERAGES = ("prob", "rank")
CALIBRATIONS = ("none", "temperature", "platt", "isotonic")
CORRECTIONS = ("none", "knn")

PREDICT_OPTIONS = {
    "tta": Option("none", choice(*TTA_MODES), "|".join(TTA_MODES),
                  "d8 = the 8 quarter turns and flips, rot8 / rot16 = rotations by every 45 / 22.5 degrees"),
    "batch_size": Option(64, at_least(1), "N"),
    "num_workers": Option(2, at_least(0), "N"),
    "device": Option("auto", text, "auto|cpu|cuda|cuda:N"),
    "features": Option(False, boolean, "false|true",
                       "also keep each image's pre-logit features in feat_<NAME>.npz, for ensemble ... correct=knn"),
}
ENSEMBLE_OPTIONS = {
    "weights": Option("equal", choice(*WEIGHTS), "|".join(WEIGHTS),
                      "oof: log-loss-optimal weights; greedy: Caruana's selection with replacement; stack: logistic "
                      "regression"),
    "threshold": Option(0.5, parse_threshold, "0.5|oof|NUMBER", "oof: maximise weighted F1"),
    "average": Option("prob", choice(*AVERAGES), "|".join(AVERAGES)),
    "calibrate": Option("none", choice(*CALIBRATIONS), "|".join(CALIBRATIONS)),
    "correct": Option("none", choice(*CORRECTIONS), "|".join(CORRECTIONS),
                      "neighbourhood correction: needs predict ... features=true"),
    "prior": Option("none", parse_prior, "none|em|bbse|SHARE",
                    "label shift: the images' share of `all`, estimated from their probabilities by EM (Saerens et "
                    "al.) or black-box shift estimation (Lipton et al.), or known, e.g. prior=0.5; probabilities "
                    "re-weighted to it by Bayes' rule"),
}


# The choices of the CLI's flags, declared once: argparse offers them (cli.py) and the library checks them.
SPLIT_BY = {
    "subject": "no subject in two folds (default)",
    "official": "C-NMC's own fold_0..2",
    "image": "the report's leaky random split",
}
PRUNERS = ("median", "hyperband", "none")  # tune --pruner: stops unpromising trials early
GRADCAM_TARGETS = {"pred": "the predicted class (default)", "all": "blast", "hem": "normal"}
EXPORT_FORMATS = ("onnx", "torchscript")


def meanings(choices: dict[str, str]) -> str:
    """{'subject': 'no subject ...', ...} -> 'subject: no subject ...; official: ...' for a flag's help."""
    return "; ".join(f"{k}: {v}" for k, v in choices.items())

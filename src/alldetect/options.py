"""`key=value` options of `predict`, `ensemble` and `evaluate`: told apart from the run folders they follow,
checked against what each command accepts, with errors that list the valid keys and values."""

from __future__ import annotations

import re
from collections.abc import Callable
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


def parse_options(options: dict[str, str], spec: dict[str, tuple[Any, Callable[[str], Any]]],
                  command: str) -> dict[str, Any]:
    """spec: {key: (default, parse)}; parse raises ValueError with a message that says what is allowed."""
    unknown = sorted(set(options) - set(spec))
    if unknown:
        valid = ", ".join(f"{k}=" for k in spec)
        token = f"{unknown[0]}={options[unknown[0]]}"
        hint = f" (to name the folder {token}, write ./{token})" if Path(token).exists() else ""
        raise UserError(f"unknown option {unknown[0]}= for `alldetect {command}`{hint}. Valid options: {valid}")
    out = {key: default for key, (default, _) in spec.items()}
    for key, raw in options.items():
        try:
            out[key] = spec[key][1](raw)
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

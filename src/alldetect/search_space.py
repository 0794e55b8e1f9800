"""Search spaces for `alldetect tune`: config key -> distribution, read from configs/search/<arch>.yaml.

    lr:         {type: float, low: 1.0e-5, high: 1.0e-2, log: true}
    batch_size: {type: categorical, choices: [16, 32, 64]}
    aug.rotate: {type: float, low: 0.0, high: 0.5}
    epochs:     {type: int, low: 10, high: 40, step: 10}

Every key is checked against the config (valid_keys) and every range end against the config's own types and
bounds, so a trial never fails on a value the search space should not have proposed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from alldetect.config import (
    UNSEARCHABLE_ROLES,
    Config,
    configs_dir,
    deep_merge,
    keys_with_role,
    nest,
    read_yaml,
    valid_keys,
)
from alldetect.errors import UserError

# Keys that pick the data, the split, the run's place, how it runs or bookkeeping: searching them compares nothing
# (config.UNSEARCHABLE_ROLES).
NOT_SEARCHABLE = keys_with_role(UNSEARCHABLE_ROLES)
FIELDS = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"},
          "categorical": {"choices"}}


@dataclass(frozen=True)
class SearchSpace:
    source: str
    params: dict[str, dict[str, Any]]  # key -> {"type": ..., ...}, normalised (what a study stores)

    def suggest(self, trial) -> dict[str, Any]:
        """Ask an Optuna trial for one value per key; returns {key: value}."""
        out = {}
        for key, p in self.params.items():
            if p["type"] == "categorical":
                out[key] = trial.suggest_categorical(key, p["choices"])
            elif p["type"] == "int":
                out[key] = trial.suggest_int(key, p["low"], p["high"], step=p["step"], log=p["log"])
            else:
                out[key] = trial.suggest_float(key, p["low"], p["high"], step=p["step"], log=p["log"])
        return out


def space_file(arch: str, path: str | Path | None = None) -> Path:
    """--space FILE, else configs/search/<arch>.yaml, else configs/search/default.yaml."""
    if path:
        return Path(path)
    folder = configs_dir() / "search"
    own = folder / f"{arch}.yaml"
    return own if own.is_file() else folder / "default.yaml"


def load_search_space(path: str | Path, base: Config) -> SearchSpace:
    raw = read_yaml(path)
    if not raw:
        raise UserError(f"search space {path} is empty: give at least one key, e.g. "
                        "lr: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}")
    keys = set(valid_keys())
    params = {}
    for key, spec in raw.items():
        where = f"search space {path}, key '{key}'"
        if key not in keys:
            hint = " (write nested keys with dots, e.g. aug.rotate)" if isinstance(spec, dict) and key in ("data", "aug") else ""
            raise UserError(f"{where}: unknown config key{hint}. Valid keys: {', '.join(sorted(keys - NOT_SEARCHABLE))}")
        if key in NOT_SEARCHABLE:
            raise UserError(f"{where}: {key} chooses the data, the split, where things are, how the "
                            "work runs or bookkeeping, not the experiment, and cannot be searched")
        params[key] = _normalise(where, spec)
        _check_values(where, key, params[key], base)
    return SearchSpace(str(path), params)


def _normalise(where: str, spec: Any) -> dict[str, Any]:
    if not isinstance(spec, dict) or spec.get("type") not in FIELDS:
        raise UserError(f"{where}: needs a mapping with type float, int or categorical, e.g. "
                        "{type: float, low: 0.0, high: 0.5} or {type: categorical, choices: [16, 32]}")
    kind = spec["type"]
    unknown = set(spec) - FIELDS[kind] - {"type"}
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(sorted(unknown))} for type {kind} "
                        f"(allowed: {', '.join(sorted(FIELDS[kind]))})")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: categorical needs a non-empty list of choices, e.g. choices: [16, 32, 64]")
        if any(c is not None and not isinstance(c, (bool, int, float, str)) for c in choices):
            raise UserError(f"{where}: choices must be numbers, strings, booleans or null, not lists or mappings")
        if len(set(map(repr, choices))) < len(choices):
            raise UserError(f"{where}: choices {choices} repeat a value")
        return {"type": kind, "choices": choices}
    number = int if kind == "int" else (int, float)
    low, high = _number(spec.get("low"), kind), _number(spec.get("high"), kind)
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, number) or not math.isfinite(value):
            raise UserError(f"{where}: {name} must be a finite {'integer' if kind == 'int' else 'number'}, "
                            f"not {value!r}")
    if low > high:
        raise UserError(f"{where}: inverted range, low={low} is above high={high}")
    if low == high:
        raise UserError(f"{where}: empty range, low = high = {low}; fix the value in the config instead")
    log, step = bool(spec.get("log", False)), _number(spec.get("step"), kind)
    if log and low <= 0:
        raise UserError(f"{where}: a log range needs low > 0, not {low}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, number) or step <= 0):
        raise UserError(f"{where}: step must be a positive {'integer' if kind == 'int' else 'number'}")
    if step is not None and log:
        raise UserError(f"{where}: use either log: true or step, not both")
    if step is not None and step > high - low and not math.isclose(step, high - low):
        raise UserError(f"{where}: step {step} is wider than the range {low}..{high}, so the search would try "
                        f"{low} alone; use a step of at most {high - low:g}, or fix the value in the config instead")
    if kind == "int":
        step = step or 1
    return {"type": kind, "low": low if kind == "int" else float(low), "high": high if kind == "int" else float(high),
            "log": log, "step": step if step is None or kind == "int" else float(step)}


def _number(value: Any, kind: str) -> Any:
    """YAML reads 1e-2 (no dot) as a string; the config accepts it as a number, and so does a search space."""
    if isinstance(value, str):
        try:
            return TypeAdapter(int if kind == "int" else float).validate_python(value)
        except ValidationError:
            return value  # reported as not a number by the caller
    return value


def _check_values(where: str, key: str, p: dict, base: Config) -> None:
    """The ends of a range, a point inside it and every choice must be valid settings of `key`."""
    if p["type"] == "categorical":
        values = p["choices"]
    else:
        inside = math.sqrt(p["low"] * p["high"]) if p["log"] else p["low"] + 0.37 * (p["high"] - p["low"])
        values = [p["low"], p["high"], round(inside) if p["type"] == "int" else inside]
    for value in values:
        try:
            Config.model_validate(deep_merge(base.to_dict(), nest({key: value})))
        except ValidationError as e:
            raise UserError(f"{where}: {value!r} is not a valid {key} ({e.errors()[0]['msg']})") from None

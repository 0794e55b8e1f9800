"""Typed configuration: YAML layers (base -> architecture -> profile -> recipe -> files) plus `key=value` overrides.

Every setting of a run lives here; the resolved config is written next to the run's checkpoints and
carried inside them, so a later step can rebuild the model without being told anything.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from alldetect.errors import UserError

DATA_ENV = "ALLDETECT_DATA"


# What a setting is, recorded on its field (`role=`; a field without one is part of the experiment). The questions
# asked of a setting are answered from these roles here and nowhere else: may a resumed run change it
# (RESUMABLE_ROLES), may the workers and runs of one Optuna study differ in it (STUDY_RUNTIME_ROLES), may a search
# space vary it (UNSEARCHABLE_ROLES).
ROLES = {
    "command": "the command's own bookkeeping (resume, overwrite, the W&B group)",
    "place": "where things are: moving them changes nothing",
    "runtime": "how the work is done: the same numbers (device, loader workers, cache, logging)",
    "numerics": "the same experiment in other bits: mixed precision, memory layout, where augmentations run",
    "split": "how a fold file is made (the fold file's own assignment is checked on its own)",
    "length": "how long the run lasts: a resumed run may be extended",
}
RESUMABLE_ROLES = {"command", "place", "runtime", "length"}
STUDY_RUNTIME_ROLES = {"command", "place", "runtime", "numerics"}
UNSEARCHABLE_ROLES = {"command", "place", "runtime", "numerics", "split"}


def _role(role: str, default: Any, **constraints: Any) -> Any:
    assert role in ROLES, role
    return Field(default, json_schema_extra={"role": role}, **constraints)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    root: str | None = _role("place", None)  # dataset folder; else $ALLDETECT_DATA; else the built-in demo data
    fold_file: str | None = _role("place", None)  # made on first use when unset
    k: int = _role("split", 5, ge=2)
    split_by: Literal["subject", "official", "image"] = _role("split", "subject")
    crop: int = Field(400, ge=0)  # centre crop (px) before resizing: the report's 450 -> 400; 0 = none
    num_workers: int = _role("runtime", 2, ge=0)
    skip_bad: bool = _role("runtime", False)  # a fold file made with it lists what it left out
    cache: bool = _role("runtime", False)  # decoded-image cache (crop + resize done once) shared by every run of that size
    cache_dir: str = _role("place", "data/cache")
    extra: list[str] = []  # labelled image folders added to every run's training images (never validated on)


class AugConfig(_Section):
    """Probabilities of the training-only augmentations. Built directly, the report's (rot90, rot270, flips at 0.5);
    a run's defaults come from configs/base.yaml, which adds rotation by any angle and strong colour jitter."""

    rot90: float = Field(0.5, ge=0, le=1)
    rot270: float = Field(0.5, ge=0, le=1)
    hflip: float = Field(0.5, ge=0, le=1)
    vflip: float = Field(0.5, ge=0, le=1)
    rotate: float = Field(0.0, ge=0, le=1)  # rotation by any angle (safe for a round cell)
    rotate_limit: float = Field(180.0, gt=0, le=180)  # ... of up to this many degrees either way
    # what rotations fill the uncovered corners with: black, a reflection of the image, or auto (black when the
    # training images' corners are black, as C-NMC's; reflect for full-frame images: data/background.py)
    border: Literal["auto", "black", "reflect"] = "auto"
    color_jitter: float = Field(0.0, ge=0, le=1)
    jitter_strength: float = Field(0.1, gt=0, le=0.5)  # brightness, contrast, saturation by up to this share
    stain: float = Field(0.0, ge=0, le=1)  # stain augmentation: albumentations' HEStain (Macenko vectors, intensities)


class Config(_Section):
    arch: str = _role("command", "proposed")
    seed: int = 42
    runs_dir: str = _role("place", "runs")
    folds_dir: str = _role("place", "folds")
    study: str = _role("command", "alldetect")  # W&B group (alldetect tune groups its trials by the study's name)
    recipe: str | None = None  # add configs/recipes/<recipe>.yaml after the arch/profile layers (e.g. report)
    # add configs/tuned/<arch>.yaml (written by alldetect tune) after the arch/profile layers
    tuned: bool = _role("command", False)
    # model
    input_size: int | None = Field(None, ge=32)  # None: the architecture's natural size
    dropout: float = Field(0.0, ge=0, lt=1)
    subtract_mean: bool = False  # the network subtracts each image's mean colour from its input (Pan et al.)
    pretrained: bool = False
    pretrained_path: str | None = _role("place", None)
    # optimisation (timm's optimiser and scheduler factories)
    optimizer: str = "adamw"  # sgd (plain, with `momentum`) | adam | adamw | any of timm.optim.list_optimizers()
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    layer_decay: float | None = Field(None, gt=0, le=1)  # layer-wise lr decay (timm); None = off
    # one learning rate per coarse layer group, stem to head (resnets: stem, 4 stages, head); replaces lr
    lr_stages: list[float] | None = None
    batch_size: int = Field(32, ge=1)
    accum_steps: int = Field(1, ge=1)  # gradient accumulation: one optimiser update per this many batches
    clip_grad: float = Field(0.0, ge=0)  # clip the gradients' global norm to this; 0 = off
    epochs: int = _role("length", 30, ge=1)
    scheduler: Literal["none", "cosine", "step", "onecycle"] = "onecycle"
    warmup_epochs: float | None = Field(None, ge=0)  # linear warm-up from lr/25; None: 0 (onecycle: 30 %)
    min_lr: float = Field(0.0, ge=0)  # where cosine and one-cycle end
    step_size: int = Field(10, ge=1)
    gamma: float = Field(0.1, gt=0, le=1)
    freeze_epochs: int = Field(0, ge=0)  # train only the head for this many epochs first
    label_smoothing: float = Field(0.1, ge=0, lt=0.5)
    mixup: float = Field(0.0, ge=0)  # mixup alpha (timm.data.Mixup); 0 = off
    cutmix: float = Field(0.0, ge=0)  # cutmix alpha; 0 = off
    mix_prob: float = Field(1.0, gt=0, le=1)  # share of batches that mixup / cutmix touch
    ema: bool = True  # evaluate, select and keep an exponential moving average of the weights (timm ModelEmaV3)
    ema_decay: float = Field(0.999, gt=0, lt=1)  # a cap: timm's warm-up decay 1-(1+update)^-2/3 stays below it
    patience: int = _role("length", 0, ge=0)  # early stopping after this many epochs without improvement; 0 = off
    monitor: Literal["f1", "accuracy", "roc_auc", "loss"] = "f1"
    select: Literal["inner", "last", "ema", "outer"] = "ema"  # which weights become best.pt (see the README)
    select_share: float = Field(0.2, gt=0, le=0.5)  # select=inner: share of each class's training images held out
    class_balance: Literal["none", "loss", "sampler"] = "none"
    # runtime
    device: str = _role("runtime", "auto")  # auto | cpu | cuda | cuda:N
    amp: bool = _role("numerics", True)  # mixed precision on CUDA (bf16 where supported); always fp32 on the CPU
    channels_last: bool = _role("numerics", True)  # on CUDA
    compile: bool = _role("runtime", False)  # torch.compile on CUDA (engine/accel.py); the arch configs say where it pays
    # default | reduce-overhead (CUDA graphs: for small, launch-bound batches) | max-autotune-no-cudagraphs
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = _role("runtime", "default")
    augment_on: Literal["cpu", "gpu"] = _role("numerics", "cpu")  # gpu: flips/rotations/jitter on whole batches on the device
    max_batches: int = Field(0, ge=0)  # cap on training batches per epoch (smoke tests); 0 = all
    wandb: Literal["auto", "offline", "online", "off"] = _role("runtime", "auto")  # auto: $WANDB_MODE, else offline
    resume: bool = _role("command", False)
    overwrite: bool = _role("command", False)
    data: DataConfig = DataConfig()
    aug: AugConfig = AugConfig()

    @field_validator("lr", "momentum", "weight_decay", "layer_decay", "clip_grad", "warmup_epochs", "min_lr", "gamma",
                     "label_smoothing", "mixup", "cutmix", "mix_prob", "ema_decay", "select_share", "dropout")
    @classmethod
    def _finite(cls, value):
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        if value in ("sgd", "adam", "adamw"):
            return value
        from timm.optim import list_optimizers

        if value not in list_optimizers():
            raise ValueError("not an optimiser: use sgd, adam, adamw or another of timm.optim.list_optimizers()")
        return value

    @model_validator(mode="before")
    @classmethod
    def _lr_of_stages(cls, data):
        """lr_stages replaces lr: the schedule's peak is the largest stage's rate."""
        stages = data.get("lr_stages") if isinstance(data, dict) else None
        try:  # a command line's 1e-6 reaches here as text (YAML 1.1); the field validator reports bad values
            rates = [float(s) for s in stages] if isinstance(stages, list) else []
        except (TypeError, ValueError):
            rates = []
        if rates and all(r > 0 and math.isfinite(r) for r in rates):
            data = {**data, "lr": max(rates)}
        return data

    @field_validator("lr_stages")
    @classmethod
    def _positive_stages(cls, value):
        if value is not None and (not value or not all(math.isfinite(v) and v > 0 for v in value)):
            raise ValueError("give one positive learning rate per layer group, e.g. [1e-6, 1e-6, 1e-4, 1e-4, 1e-4, 1e-2]")
        return value

    @property
    def resolved_input_size(self) -> int:
        """The input size in pixels: input_size, else the architecture's natural one (proposed 300, inception_v3
        299, timm models their pretrained configuration's)."""
        from alldetect.models.names import default_input_size

        return self.input_size or default_input_size(self.arch)

    @model_validator(mode="after")
    def _consistent(self):
        if self.resume and self.overwrite:
            raise ValueError("resume=true and overwrite=true contradict each other: resume=true continues the run in "
                             "its folder, overwrite=true deletes it first. Choose one")
        if self.warmup_epochs is not None and self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs:g} must be shorter than the run (epochs={self.epochs})")
        if self.lr_stages and self.layer_decay:
            raise ValueError("lr_stages and layer_decay both set each layer group's learning rate: choose one")
        if self.freeze_epochs and self.freeze_epochs >= self.epochs:
            raise ValueError(f"freeze_epochs={self.freeze_epochs} with epochs={self.epochs}: only the head would ever "
                             f"train. Use freeze_epochs below epochs (e.g. freeze_epochs={max(self.epochs - 1, 0)}), "
                             "or freeze_epochs=0 to train the whole network from the start")
        if (self.mixup or self.cutmix) and self.batch_size < 2:
            key = f"mixup={self.mixup}" if self.mixup else f"cutmix={self.cutmix}"
            raise ValueError(f"{key} mixes pairs of images of a batch, and batch_size=1 has no pairs: use "
                             "batch_size=2 or more, or mixup=0 cutmix=0")
        if self.select == "ema" and not self.ema:
            raise ValueError("select=ema keeps the averaged weights: add ema=true")
        if self.patience and self.select in ("last", "ema"):
            raise ValueError(f"select={self.select} trains a fixed schedule, so there is nothing to stop early on: "
                             "use patience=0, or select=inner to stop on a validation split of the training folds")
        return self

    @field_validator("wandb", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        # YAML reads a bare `off` / `on` as a boolean.
        return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def configs_dir() -> Path:
    """The project's configs/ folder: $ALLDETECT_CONFIGS, ./configs, or the one beside src/."""
    env = os.environ.get("ALLDETECT_CONFIGS")
    candidates = [Path(env)] if env else []
    candidates += [Path.cwd() / "configs", Path(__file__).resolve().parents[2] / "configs"]
    for c in candidates:
        if (c / "base.yaml").is_file():
            return c
    raise UserError(
        "cannot find configs/base.yaml; run from the project folder or set ALLDETECT_CONFIGS=/path/to/configs"
    )


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def valid_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """The settings a user may give (arch is the command's argument, not one of them)."""
    keys = []
    for name, field in model.model_fields.items():
        if not prefix and name == "arch":
            continue
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += valid_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def keys_with_role(roles: set[str], model: type[BaseModel] = Config, prefix: str = "") -> set[str]:
    """Every key (dotted, arch included) whose field's role is one of `roles`."""
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys |= keys_with_role(roles, ann, f"{prefix}{name}.")
        elif isinstance(extra := field.json_schema_extra, dict) and extra.get("role") in roles:
            keys.add(prefix + name)
    return keys


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['lr=3e-4', 'data.root=/x'] -> {'lr': '3e-4', 'data': {'root': '/x'}}; types are checked later."""
    out: dict[str, Any] = {}
    keys = set(valid_keys())
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"'{item}' is not a key=value override (e.g. lr=3e-4 or data.root=/data/C-NMC)")
        if key == "arch":
            raise UserError(f"'{item}': the architecture is the command's first argument (e.g. ./train.sh resnet50 "
                            "fold0), not a setting")
        if key not in keys:
            raise UserError(f"unknown config key '{key}'. Valid keys: {', '.join(sorted(keys))}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise UserError(f"'{item}': the value is not valid YAML ({getattr(e, 'problem', None) or e}); quote it, "
                            f"e.g. {key}='\"{raw}\"'") from None
        out = deep_merge(out, nest({key: value}))
    return out


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{'lr': 1e-3, 'aug.rotate': 0.3} -> {'lr': 1e-3, 'aug': {'rotate': 0.3}}"""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """nest's inverse: {'aug': {'rotate': 0.3}} -> {'aug.rotate': 0.3}"""
    out: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def validate(raw: dict[str, Any], where: str = "the configuration") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                lines.append(f"unknown key '{key}'")
            elif not key:  # a rule about several keys together
                lines.append(err["msg"].removeprefix("Value error, "))
            else:
                lines.append(f"{key}={err.get('input')!r}: {err['msg'].removeprefix('Value error, ')}")
        unknown = any(err["type"] == "extra_forbidden" for err in e.errors())
        raise UserError(f"invalid settings in {where}:\n  " + "\n  ".join(lines)
                        + (f"\nValid keys: {', '.join(sorted(valid_keys()))}" if unknown else "")) from None


def load_config(
    arch: str,
    overrides: list[str] | None = None,
    files: Sequence[str | Path] | None = None,
    profile: str | None = None,
) -> Config:
    """base.yaml -> <arch>.yaml (if any) -> <profile>.yaml -> recipes/<recipe>.yaml (recipe=NAME) ->
    tuned/<arch>.yaml (tuned=true) -> each of `files` -> overrides -> $ALLDETECT_DATA."""
    cdir = configs_dir()
    layers = [read_yaml(cdir / "base.yaml")]
    if (cdir / f"{arch}.yaml").is_file():
        layers.append(read_yaml(cdir / f"{arch}.yaml"))
    if profile:
        layers.append(read_yaml(cdir / f"{profile}.yaml"))
    over = parse_overrides(overrides or [])
    later = [read_yaml(f) for f in files or []] + [over]
    raw = _merge_all(layers + later)
    recipe = raw.get("recipe")
    if recipe:  # a published recipe: after the architecture and profile, before tuned settings and files
        layers.append(read_yaml(recipe_path(str(recipe))))
        raw = _merge_all(layers + later)
    if _wants_tuned(raw):
        layers.append(read_yaml(tuned_config_path(arch, must_exist=True)))
        raw = _merge_all(layers + later)
    for f, layer in zip(files or [], later):
        if layer.get("arch") not in (None, arch):
            raise UserError(f"{f} sets arch: {layer['arch']}, but the command trains {arch}: the architecture is the "
                            "command's first argument; remove arch from the file or name it on the command line")
    raw["arch"] = arch
    # Precedence of the data root: key=value > --config files > $ALLDETECT_DATA > the configs/ layers.
    env_root = os.environ.get(DATA_ENV)
    if env_root and not any(isinstance(layer.get("data"), dict) and "root" in layer["data"] for layer in later):
        if isinstance(raw.setdefault("data", {}), dict):  # else validate() names the malformed `data:`
            raw["data"]["root"] = env_root
    return validate(raw, where="the config files and overrides")


def recipe_path(name: str) -> Path:
    """configs/recipes/<name>.yaml: a named set of training settings (the report's, a paper's)."""
    folder = configs_dir() / "recipes"
    known = sorted(p.stem for p in folder.glob("*.yaml") if not p.name.startswith("."))
    if name not in known:  # also every path-like name (../base, /x): a recipe is never another config file
        raise UserError(f"recipe={name}: no such recipe; choose one of {', '.join(known) or '(none)'} (a recipe is "
                        f"the name of a file in {folder}, without '.yaml', not a path)")
    return folder / f"{name}.yaml"


def tuned_config_path(arch: str, must_exist: bool = False) -> Path:
    """configs/tuned/<arch>.yaml: the best trial of `alldetect tune ARCH`."""
    path = configs_dir() / "tuned" / f"{arch}.yaml"
    if must_exist and not path.is_file():
        raise UserError(f"tuned=true but {path} does not exist: run `alldetect tune {arch}` first "
                        "(or pass --config FILE with the settings you want)")
    return path


def _merge_all(layers: list[dict]) -> dict:
    raw: dict = {}
    for layer in layers:
        raw = deep_merge(raw, layer)
    return raw


def _wants_tuned(raw: dict) -> bool:
    try:
        return TypeAdapter(bool).validate_python(raw.get("tuned", False))
    except ValidationError:
        return False  # validate() reports the bad value with the others


def save_config(cfg: Config, path: str | Path) -> None:
    from alldetect.atomic import write_text

    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

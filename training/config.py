"""Training recipes as YAML, read strictly: every field is used, an unknown one is an error.

```yaml
model:                 # what is trained
  family: latte        # dit | latte | latte_t2v | wan (wan: rectified flow, training/objective.py)
  preset: Latte-tiny   # a preset of the family (optional)
  config: {skip: true} # config field overrides (after the preset / the pretrained config)
  init_from: null      # a pretrained checkpoint; a vanilla one becomes Skip-DiT with new skip branches
  skip_init: paper     # new skip branches: paper (the family's init) | pass_through (pass the hidden state on:
                       # exactly with config.skip_fusion: residual, calibrated with the paper's; training/convert.py)
data: {type: moving_shapes, num_frames: 8, size: 32}   # keyword arguments of training.data.build_dataset
train: {...}           # TrainSection below
sample: {...}          # SampleSection below (optional videos during training)
```
Command-line `--set train.max_steps=10` overrides a field (YAML syntax for the value).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import yaml

from skipdit_core.loading import DTYPES

from .objective import FLOW_FAMILIES  # trained with rectified flow (FlowObjective)


@dataclass
class ModelSection:
    family: str = "latte"
    preset: Optional[str] = None
    config: dict = field(default_factory=dict)
    init_from: Optional[str] = None
    skip_init: str = "paper"  # "paper" | "pass_through": how new skip branches start (training/convert.py)


@dataclass
class TrainSection:
    output_dir: str = "runs/train"
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 8  # per process and micro-batch; global = batch_size * processes * grad_accum_steps
    grad_accum_steps: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up of the learning rate, then constant
    grad_clip: Optional[float] = 1.0  # max gradient norm; null disables clipping
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay min(ema_decay, (1 + step) / (10 + step)): for short runs
    trainable: str = "all"  # "all", or "skip_branches": only skip_norms / skip_linears (stage 1)
    mixed_precision: Optional[str] = None  # "no" | "fp16" | "bf16"; null: what `accelerate launch` says
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2  # the newest N step folders are kept
    save_dtype: Optional[str] = None  # dtype of the exported .safetensors (fp16 / bf16 / fp32); null: fp32
    flow_shift: Optional[float] = None  # wan: the shift of the training sigma draw; null: 5 (WAN_SHIFT, the sampler's)
    text_dropout: float = 0.0  # text families: chance that a sample's text states are zeroed (the empty prompt of
    #                            guidance's unconditional half), as class_dropout_prob does for class labels
    activation_checkpointing: bool = False  # recompute each of model.blocks' activations in the backward pass (Wan:
    #                            memory for long clips); under FSDP the accelerate config's fsdp_activation_checkpointing
    #                            does it instead when set


@dataclass
class SampleSection:
    every: int = 0  # optimizer steps between sample videos from the EMA model; 0 = never
    sampler: str = "ddim"  # wan: euler (its only sampler)
    steps: int = 50
    guidance: Optional[float] = None
    labels: list = field(default_factory=lambda: [0])
    frames: Optional[int] = None  # default: the model's num_frames
    size: Optional[int] = None  # default: the data's size
    fps: int = 8


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: dict = field(default_factory=dict)
    train: TrainSection = field(default_factory=TrainSection)
    sample: SampleSection = field(default_factory=SampleSection)

    def to_dict(self) -> dict:
        return asdict(self)


SECTIONS = {"model": ModelSection, "train": TrainSection, "sample": SampleSection}
FAMILIES = ("dit", "latte", "latte_t2v", "wan")  # the families training/ trains
TEXT_FAMILIES = ("latte_t2v", "wan")
TRAINABLE = ("all", "skip_branches")
SKIP_INITS = ("paper", "pass_through")


class ConfigError(ValueError):
    pass


def _section(name: str, cls, values, source: str):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section {name!r} must be a mapping, got {type(values).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                          f"{name} accepts: {', '.join(sorted(known))}")
    values = dict(values)
    for f in fields(cls):
        # YAML 1.1 reads `1e-4` (no dot) as a string: numbers of float fields are coerced.
        if f.type in ("float", "Optional[float]") and isinstance(values.get(f.name), (int, str)) \
                and not isinstance(values.get(f.name), bool):
            try:
                values[f.name] = float(values[f.name])
            except ValueError:
                raise ConfigError(f"{source}: {name}.{f.name} must be a number, got {values[f.name]!r}") from None
    return cls(**values)


def from_dict(raw: dict, source: str = "config") -> TrainConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with sections {', '.join(['model', 'data', 'train', 'sample'])}")
    unknown = sorted(set(raw) - {"model", "data", "train", "sample"})
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(unknown)}; sections: model, data, train, sample")
    cfg = TrainConfig(
        model=_section("model", ModelSection, raw.get("model"), source),
        data=dict(raw.get("data") or {}),
        train=_section("train", TrainSection, raw.get("train"), source),
        sample=_section("sample", SampleSection, raw.get("sample"), source),
    )
    if cfg.model.family not in FAMILIES:
        raise ConfigError(f"{source}: model.family must be one of {', '.join(FAMILIES)}, got {cfg.model.family!r}")
    flow = cfg.model.family in FLOW_FAMILIES
    if cfg.train.flow_shift is not None and (not flow or not cfg.train.flow_shift > 0):
        raise ConfigError(f"{source}: train.flow_shift is a positive number for the flow-matching families "
                          f"({', '.join(FLOW_FAMILIES)}), got {cfg.train.flow_shift!r} for {cfg.model.family}")
    if not 0.0 <= cfg.train.text_dropout < 1.0:
        raise ConfigError(f"{source}: train.text_dropout must be in [0, 1), got {cfg.train.text_dropout!r}")
    if cfg.train.text_dropout and cfg.model.family not in TEXT_FAMILIES:
        raise ConfigError(f"{source}: train.text_dropout applies to text-conditioned families ({', '.join(TEXT_FAMILIES)}); "
                          f"{cfg.model.family} drops class labels with model.config.class_dropout_prob")
    if flow and cfg.sample.every and cfg.sample.sampler != "euler":
        raise ConfigError(f"{source}: a {cfg.model.family} model samples with euler (flow matching), "
                          f"not sample.sampler {cfg.sample.sampler!r}")
    if cfg.model.skip_init not in SKIP_INITS:
        raise ConfigError(f"{source}: model.skip_init must be one of {', '.join(SKIP_INITS)}, got {cfg.model.skip_init!r}")
    if cfg.train.trainable not in TRAINABLE:
        raise ConfigError(f"{source}: train.trainable must be one of {', '.join(TRAINABLE)}, got {cfg.train.trainable!r}")
    if "type" not in cfg.data:
        raise ConfigError(f"{source}: the data section needs a type (moving_shapes, video_folder, image_folder, latents)")
    if cfg.train.save_dtype is not None and cfg.train.save_dtype not in DTYPES:
        raise ConfigError(f"{source}: train.save_dtype must be one of {', '.join(DTYPES)} or null, got {cfg.train.save_dtype!r}")
    for name in ("max_steps", "batch_size", "grad_accum_steps", "log_every", "save_every", "keep_checkpoints"):
        if getattr(cfg.train, name) < 1:
            raise ConfigError(f"{source}: train.{name} must be >= 1, got {getattr(cfg.train, name)}")
    return cfg


def apply_overrides(raw: dict, pairs: list[str]) -> dict:
    """`section.field=value` (value in YAML syntax; `data.*` and `model.config.*` keys are free)."""
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set expects section.field=value, got {pair!r}")
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        node[leaf] = yaml.safe_load(value)
    return raw


def load_config(path: str, overrides: Optional[list[str]] = None) -> TrainConfig:
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    return from_dict(apply_overrides(raw, overrides or []), source=path)

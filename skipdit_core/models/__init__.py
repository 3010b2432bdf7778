"""The five Skip-DiT-capable families and how to tell them apart by their keys.

| family     | class     | checkpoints                                                    |
|------------|-----------|----------------------------------------------------------------|
| dit        | DiT       | DiT-XL-2-{256,512}.pt, DiT-XL-2-skip.pt                        |
| latte      | Latte     | ffs / sky / taichi / ucf101 (+ `-skip`) class & uncond. video  |
| latte_t2v  | LatteT2V  | Latte-1 (diffusers layout), Latte-skip.pt                      |
| hunyuan    | HunyuanDiT| Hunyuan-DiT v1.0-v1.2 (Tencent layout; diffusers layout mapped)|
| wan        | WanModel  | Wan 2.1 T2V 1.3B / 14B, Wan 2.2 TI2V 5B (Wan-AI layout, also under |
|            |           | ComfyUI's `model.diffusion_model.`; diffusers layout mapped)   |
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable, Optional

from torch import nn

from . import dit, hunyuan, latte, latte_t2v, ustack, wan
from .dit import DiT, DiTConfig
from .hunyuan import HunyuanDiT, HunyuanDiTConfig
from .latte import Latte, LatteConfig
from .latte_t2v import LatteT2V, LatteT2VConfig
from .ustack import StackCut, UStack
from .wan import WanConfig, WanModel


@dataclass(frozen=True)
class Family:
    name: str
    model_cls: type
    config_cls: type
    presets: dict
    config_from_state_dict: Callable[[dict], object]
    description: str
    # key -> (why the model does not use it, config -> expected shape with None for a free size)
    optional_keys: dict = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    "dit": Family("dit", DiT, DiTConfig, dit.DIT_PRESETS, dit.config_from_state_dict, "DiT class-to-image"),
    "latte": Family(
        "latte", Latte, LatteConfig, latte.LATTE_PRESETS, latte.config_from_state_dict,
        "Latte class-conditional / unconditional video",
    ),
    "latte_t2v": Family(
        "latte_t2v", LatteT2V, LatteT2VConfig, latte_t2v.LATTE_T2V_PRESETS, latte_t2v.config_from_state_dict,
        "Latte text-to-video", latte_t2v.OPTIONAL_KEYS,
    ),
    "hunyuan": Family(
        "hunyuan", HunyuanDiT, HunyuanDiTConfig, hunyuan.HUNYUAN_PRESETS, hunyuan.config_from_state_dict,
        "Hunyuan-DiT text-to-image",
    ),
    "wan": Family("wan", WanModel, WanConfig, wan.WAN_PRESETS, wan.config_from_state_dict, "Wan 2.1 / 2.2 text-to-video"),
}

# Keys whose presence identifies a family, most specific first.
_SIGNATURES = [
    ("wan", ("head.modulation", "patch_embedding.weight")),
    ("hunyuan", ("mlp_t5.0.weight",)),
    ("latte_t2v", ("temporal_transformer_blocks.0.attn1.to_q.weight",)),
    ("latte", ("blocks.0.attn.qkv.weight", "temp_embed")),
    ("dit", ("blocks.0.attn.qkv.weight",)),
]


def identify_family(sd: dict) -> Optional[str]:
    """The family whose signature keys are all in the (Tencent / original layout) state dict."""
    for name, keys in _SIGNATURES:
        if all(k in sd for k in keys):
            return name
    return None


# Config fields the weights do not determine (the head split), which detection takes from the user.
HEAD_FIELDS = ("num_heads", "head_dim")


def config_from_weights(family: str, sd: dict, overrides: Optional[dict] = None):
    """The config of a state dict: its shapes, with `overrides` applied. The head split is not in
    the weights: given num_heads / head_dim are used for it (and checked against the width) before
    any default is inferred, so a width no default fits loads once the user gives them."""
    fam = FAMILIES[family]
    known = {f.name for f in fields(fam.config_cls)}
    hints = {k: v for k, v in (overrides or {}).items() if k in HEAD_FIELDS and k in known}
    return make_config(family, overrides, base=fam.config_from_state_dict(sd, **hints))


def make_config(family: str, overrides: Optional[dict] = None, preset: Optional[str] = None, base=None):
    """A config of `family` from a preset name or a detected config, with field overrides.

    Over a detected config (base), a (num_heads, head_dim) split keeps the width: given one half,
    the other follows; given both, they must multiply to it (Latte T2V's width is their product)."""
    fam = FAMILIES[family]
    known = {f.name for f in fields(fam.config_cls)}
    overrides = dict(overrides or {})
    if base is not None and "head_dim" in known and any(k in overrides for k in HEAD_FIELDS):
        overrides["num_heads"], overrides["head_dim"] = latte_t2v.head_split(
            base.hidden_size, overrides.get("num_heads"), overrides.get("head_dim"))
    values = {}
    if base is not None:
        values.update({f.name: getattr(base, f.name) for f in fields(base)})
    if preset is not None:
        if preset not in fam.presets:
            raise ValueError(f"unknown {family} preset {preset!r}; known: {', '.join(fam.presets)}")
        values.update(fam.presets[preset])
    for key in overrides or {}:
        if key not in known:
            raise ValueError(f"{fam.config_cls.__name__} has no field {key!r}; fields: {', '.join(sorted(known))}")
    values.update(overrides or {})
    if "skip_fusion" in values:  # a model without long skips never builds its branches, so check it here
        ustack.check_skip_fusion(values["skip_fusion"])
    return fam.config_cls(**values)


def build_model(family: str, config) -> nn.Module:
    return FAMILIES[family].model_cls(config)


__all__ = [
    "FAMILIES", "Family", "HEAD_FIELDS", "identify_family", "config_from_weights", "make_config", "build_model", "StackCut", "UStack",
    "DiT", "DiTConfig", "Latte", "LatteConfig", "LatteT2V", "LatteT2VConfig", "HunyuanDiT", "HunyuanDiTConfig",
    "WanModel", "WanConfig",
]

"""Skip-Cache presets, named by speed: one fixed setting per (family, long skips or not) and target speed.

Each was chosen by `benchmarks/presets.py` on tuning seeds (classes x seeds 0-3 of the trained shape models:
the realistic-depth Skip-Latte twin for Skip-DiT models, the trained 30-block Wan for models without long skips,
the Skip-Wan miniature for Wan with long skips) and reported on held-out seeds (docs/presets.md has the tables). The name is the target: the block compute
is at most 0.95 / speed of an uncached run's, so the measured speedup at a large shape (where the blocks are
nearly all the time) reaches it; docs/presets.md gives the measured figures.
"""
from __future__ import annotations

from .skip_cache import SkipCacheConfig

PRESET_SPEEDS = ("1.5x", "2x", "3x", "4x")
# A speed X gets margin / X of the block compute: the rest is left to what is not blocks (embedders, the final layer,
# the forecast), so the measured speedup at a large shape reaches X.
BUDGET_MARGIN = 0.95


def speed_budget(speed: str, margin: float = BUDGET_MARGIN) -> float:
    """The block-compute budget of a target speed such as "1.5x" or "3x": margin / speed."""
    try:
        value = float(speed.rstrip("x"))
    except ValueError:
        raise ValueError(f"a speed is a number followed by x, e.g. 1.5x or 3x; got {speed!r}") from None
    if not value > 0:
        raise ValueError(f"a speed must be positive, got {speed!r}")
    return margin / value


# (family, has long skips) -> preset name -> setting
def _whole(interval: int, forecast: int = 0, damping: float = 1.0, empty: int = 0) -> SkipCacheConfig:
    """A setting over the whole schedule (1000 -> 0) at depth 1; with empty steps, the forecast warm-up."""
    return SkipCacheConfig(interval=interval, start=1000.0, end=0.0, depth=1, forecast=forecast, forecast_damping=damping,
                           empty_steps=empty, forecast_warmup=bool(empty))


PRESETS: dict[tuple[str, bool], dict[str, SkipCacheConfig]] = {
    ("latte", True): {
        "1.5x": _whole(2, forecast=1, damping=0.7, empty=1),
        "2x": _whole(3, forecast=1, damping=0.7),
        "3x": _whole(4, forecast=2, damping=0.7, empty=2),
        "4x": _whole(5, forecast=1, damping=0.7, empty=4),
    },
    ("wan", True): {  # a Skip-Wan (Load Skip Branches on core Wan, or skipdit_core's), chosen on skip-wan-shapes
        "1.5x": _whole(2, forecast=1, empty=1),
        "2x": _whole(3, forecast=1, damping=0.7, empty=1),
        "3x": _whole(4, forecast=1),
        "4x": _whole(6, forecast=1, damping=0.7),
    },
    ("wan", False): {
        "1.5x": _whole(2, forecast=1, damping=0.7, empty=1),
        "2x": _whole(3, forecast=1, damping=0.7, empty=1),
        "3x": _whole(4, forecast=1, damping=0.7, empty=1),
        "4x": _whole(6, forecast=1, damping=0.7),
    },
}

FAMILY_NAMES = {"dit": "DiT", "latte": "Latte", "latte_t2v": "Latte T2V", "hunyuan": "Hunyuan-DiT", "wan": "Wan"}


def preset_names(family: str, has_skips: bool) -> list[str]:
    """The presets measured for this kind of model (empty: none yet)."""
    return list(PRESETS.get((family, has_skips), {}))


def preset_config(family: str, has_skips: bool, name: str) -> SkipCacheConfig:
    """The setting of preset `name` ("1.5x" .. "4x") for a model of `family` with or without long skips."""
    if name not in PRESET_SPEEDS:
        raise ValueError(f"unknown Skip-Cache preset {name!r}; presets: {', '.join(PRESET_SPEEDS)}")
    table = PRESETS.get((family, has_skips))
    kind = f"{FAMILY_NAMES.get(family, family)} {'with' if has_skips else 'without'} long skips"
    if not table:
        measured = ", ".join(f"{FAMILY_NAMES.get(f, f)} {'with' if s else 'without'} long skips" for f, s in PRESETS)
        raise ValueError(f"no Skip-Cache presets were measured for a {kind} (presets exist for: {measured}); "
                         "choose the settings yourself (interval, window, depth)")
    if name not in table:
        raise ValueError(f"no {name} Skip-Cache preset for a {kind}; its presets: {', '.join(table)}")
    return table[name]

"""The `skipdit` command (also `python -m skipdit_core`)."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from . import __version__
from . import models
from .loading import CheckpointError, convert_to_safetensors, inspect_checkpoint, save_safetensors

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _overrides(pairs: list[str]) -> dict:
    """`--set key=value` pairs; values are parsed as JSON when they can be (numbers, true/false)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_info(args) -> int:
    ckpt = inspect_checkpoint(args.checkpoint, family=args.family, overrides=_overrides(args.set))
    info = ckpt.describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['file']}")
    print(f"  family      {info['family']} ({info['description']})")
    print(f"  variant     {info['variant']} ({info['long_skips']} long skips)")
    print(f"  weights     {info['weights_from']}, {info['layout']} layout, {info['parameters']:,} parameters, {'/'.join(info['dtypes'])}")
    print("  config      " + ", ".join(f"{k}={v}" for k, v in info["config"].items()))
    return 0


def cmd_convert(args) -> int:
    ckpt = convert_to_safetensors(
        args.checkpoint, args.output, dtype=DTYPES[args.dtype] if args.dtype else None,
        family=args.family, overrides=_overrides(args.set),
    )
    print(f"wrote {args.output}: {ckpt.family}, {len(ckpt.state_dict)} tensors, config recorded in its metadata")
    return 0


def cmd_new(args) -> int:
    config = models.make_config(args.family, _overrides(args.set), preset=args.preset)
    torch.manual_seed(args.seed)
    model = models.build_model(args.family, config)
    save_safetensors(model.state_dict(), args.output, args.family, config)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.output}: a freshly initialised {args.family} model ({args.preset or 'default config'}, {n:,} parameters)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="skipdit", description="Skip-DiT models and Skip-Cache.")
    p.add_argument("--version", action="version", version=f"skipdit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def detection_args(sp):
        sp.add_argument("--family", choices=["dit", "latte", "latte_t2v", "hunyuan"], help="skip family detection")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a detected config field (repeatable)")

    info = sub.add_parser("info", help="what the loader detects in a checkpoint")
    info.add_argument("checkpoint")
    info.add_argument("--json", action="store_true", help="print JSON")
    detection_args(info)
    info.set_defaults(func=cmd_info)

    conv = sub.add_parser("convert", help="write a checkpoint's model weights as .safetensors with its config")
    conv.add_argument("checkpoint")
    conv.add_argument("output")
    conv.add_argument("--dtype", choices=list(DTYPES), help="cast floating-point weights")
    detection_args(conv)
    conv.set_defaults(func=cmd_convert)
    new = sub.add_parser("new", help="write a freshly initialised model of a preset (a starting point for training)")
    new.add_argument("output", help="a .safetensors path")
    new.add_argument("--family", required=True, choices=list(models.FAMILIES))
    new.add_argument("--preset", help="e.g. DiT-XL/2, Latte-XL/2, Latte-1-skip (see --list-presets)")
    new.add_argument("--set", action="append", metavar="KEY=VALUE", help="set a config field (repeatable), e.g. skip=true")
    new.add_argument("--seed", type=int, default=0)
    new.set_defaults(func=cmd_new)

    presets = sub.add_parser("presets", help="list the model presets of every family")
    presets.set_defaults(func=cmd_presets)
    return p


def cmd_presets(args) -> int:
    for name, fam in models.FAMILIES.items():
        print(f"{name}: {fam.description}")
        for preset, values in fam.presets.items():
            print(f"  {preset:24s} " + ", ".join(f"{k}={v}" for k, v in values.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, ValueError) as e:
        print(f"skipdit: error: {e}", file=sys.stderr)
        return 2

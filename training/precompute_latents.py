"""Encode a dataset into VAE latents once, for the latent-space recipes (`data: {type: latents, root: OUT}`).

    python -m training.precompute_latents --vae sd-vae-ft-ema --out data/ucf101-latents \
        --data type=video_folder --data root=data/UCF-101 --data num_frames=16 --data frame_interval=3 \
        --data size=256 --data class_subfolders=true [--device cuda --dtype fp16 --batch-size 8 --repeats 1]

    # Wan 2.1 / 2.2 (diffusers AutoencoderKLWan; 81 frames = 21 latent frames; captions as sidecars from
    # `skipdit encode-text --family wan --caption-dir data/videos`):
    python -m training.precompute_latents --vae Wan2.1-T2V-1.3B-Diffusers --out data/wan-latents \
        --data type=video_folder --data root=data/videos --data require_text=true --data num_frames=81 \
        --data "size=[480, 832]" --dtype bf16 --batch-size 1

`--data` pairs are the keyword arguments of `training.data.build_dataset` (values in YAML syntax);
`--vae` is a local diffusers VAE folder (or a pipeline folder with a `vae/` subfolder): an AutoencoderKL (frame by
frame, times its scaling_factor) or an AutoencoderKLWan (the Wan 2.1 / 2.2 VAE: whole clips of 1 + 4k frames,
normalised by its latents_mean / latents_std as WanPipeline does).
"""
from __future__ import annotations

import argparse

import torch
import yaml

from skipdit_core.loading import DTYPES

from .data import build_dataset, precompute_latents



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.precompute_latents", description=__doc__.split("\n")[0])
    parser.add_argument("--vae", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", action="append", default=[], metavar="KEY=VALUE", required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=1, help="encode the data this many times (new crops / flips)")
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args(argv)
    spec = {}
    for pair in args.data:
        key, sep, value = pair.partition("=")
        if not sep:
            parser.error(f"--data expects KEY=VALUE, got {pair!r}")
        spec[key] = yaml.safe_load(value)
    try:
        dataset = build_dataset(spec)
        info = precompute_latents(dataset, args.vae, args.out, batch_size=args.batch_size, device=args.device,
                                  dtype=DTYPES[args.dtype], repeats=args.repeats, num_workers=args.num_workers)
    except ValueError as e:  # bad data or VAE: one line, no traceback
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(f"wrote {info['count']} latents {tuple(info.get('shape', ()))} ({info['vae_class']}) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

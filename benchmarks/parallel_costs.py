"""Per-step compute and communication of one sample split over P processes (skipdit_core/parallel.py),
for the published shapes: what docs/sampling-at-scale.md tabulates, computed from the shapes (no run).

    python benchmarks/parallel_costs.py [--processes 2 4 8] [--bytes 2]

Compute: the multiply-adds x 2 of the blocks (qkv, out projection and MLP: 24 D^2 per token and block;
attention scores and mixing: 4 T^2 D per attention over T tokens), the whole model, one step, CFG rows
included. Communication, bytes each process sends per step:
- CFG parallel (P = 2): its half of the model output, float32 (one all-gather).
- Sequence parallel: per split self-attention layer, q, k, v and the output, each (rows, F, T / P, D) in
  the model's dtype, (P - 1) / P of it leaving the process (all-to-all); at the end its slice of the
  output tokens to each of the P - 1 others (all-gather). A Skip-Cache cached step runs the split
  attention of its 2k outer units only.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass
class Shape:
    name: str
    width: int  # D
    units: int  # stack units
    frames: int  # F (1 for images)
    tokens: int  # T per frame
    out_per_token: int  # patch^2 x output channels
    temporal: bool  # Latte: each unit is a (spatial, temporal) pair; only the spatial attention is split
    rows: int = 2  # classifier-free guidance: cond + uncond
    text_tokens: int = 0  # cross-attention keys (local, no communication)
    depth: int = 1  # Skip-Cache k on cached steps

    def flops(self, units: int) -> float:
        d, f, t = self.width, self.frames, self.tokens
        per_unit = 24 * d * d * f * t + 4 * t * t * d * f  # (spatial) block
        if self.temporal:
            per_unit += 24 * d * d * f * t + 4 * f * f * d * t  # temporal block
        if self.text_tokens:
            per_unit += 4 * d * d * f * t + 4 * t * self.text_tokens * d * f  # cross-attention q, out + scores
        return self.rows * units * per_unit

    def sequence_bytes(self, processes: int, units: int, dtype_bytes: int) -> float:
        slice_ = self.rows * self.frames * self.tokens / processes
        attention = units * 4 * slice_ * self.width * dtype_bytes * (processes - 1) / processes
        gather = slice_ * self.out_per_token * dtype_bytes * (processes - 1)
        return attention + gather

    def cfg_bytes(self) -> float:
        return self.rows // 2 * self.frames * self.tokens * self.out_per_token * 4


SHAPES = [
    # Latte-XL/2, 16 frames of 256 x 256 px (32 x 32 latent, patch 2: 256 tokens), 14 (spatial, temporal) pairs
    Shape("Latte-XL/2, 16 x 256^2", 1152, 14, 16, 256, 2 * 2 * 8, temporal=True),
    # Latte T2V (Latte-1), 16 frames of 512 x 512 px: 1024 tokens per frame, 120 T5 tokens; 28 (spatial, temporal)
    # pairs (LatteT2VConfig.num_layers counts pairs, unlike class-to-video Latte's depth)
    Shape("Latte T2V, 16 x 512^2", 1152, 28, 16, 1024, 2 * 2 * 8, temporal=True, text_tokens=120),
    # DiT-XL/2, 256 x 256 px: 256 tokens, 28 blocks, k = 4
    Shape("DiT-XL/2, 256^2", 1152, 28, 1, 256, 2 * 2 * 8, temporal=False, depth=4),
    # Hunyuan-DiT-g/2, 1024 x 1024 px: 4096 tokens, 40 blocks, 77 + 256 text tokens
    Shape("Hunyuan-DiT, 1024^2", 1408, 40, 1, 4096, 2 * 2 * 8, temporal=False, text_tokens=333),
]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--processes", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--bytes", type=int, default=2, help="bytes per value of the model's dtype (bf16: 2)")
    args = p.parse_args(argv)
    print("| shape | step compute, TFLOP (full / cached) | CFG parallel, MB sent per process and step | "
          + " | ".join(f"sequence P={n}, MB (full / cached)" for n in args.processes) + " |")
    print("|---|---:|---:|" + "---:|" * len(args.processes))
    for s in SHAPES:
        cached_units = 2 * s.depth
        cells = [f"{s.sequence_bytes(n, s.units, args.bytes) / 1e6:.1f} / {s.sequence_bytes(n, cached_units, args.bytes) / 1e6:.1f}"
                 for n in args.processes]
        print(f"| {s.name} | {s.flops(s.units) / 1e12:.2f} / {s.flops(cached_units) / 1e12:.2f} | "
              f"{s.cfg_bytes() / 1e6:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

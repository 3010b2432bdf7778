"""The training objective of each model on one fixed validation set: the same clips, noise and timesteps for every
model, so two runs of one recipe (a Skip-DiT and its vanilla twin) compare without the noise of training-loss logs.

    OMP_NUM_THREADS=1 python benchmarks/validation_loss.py --config training/configs/wan-shapes.yaml \\
        benchmarks/models/skip-wan-shapes.safetensors benchmarks/models/wan-shapes-continued.safetensors

Clips: `--items` items of the recipe's data with `--seed` (not the training seed's stream); for each, `--draws`
(timestep, noise) pairs from one generator; the loss is the recipe's objective (`training.objective`), mean and
standard error over items, and per timestep bin (quartiles of the training draw).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from skipdit_core.loading import load_model  # noqa: E402
from training.config import load_config  # noqa: E402
from training.data import build_dataset  # noqa: E402
from training.objective import make_objective  # noqa: E402
from training.train import model_inputs  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the recipe whose data and objective to use")
    p.add_argument("models", nargs="+")
    p.add_argument("--items", type=int, default=256)
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()

    cfg = load_config(args.config)
    data = dict(cfg.data, seed=args.seed)
    dataset = build_dataset(data)
    items = [dataset[i] for i in range(args.items)]
    batch = torch.utils.data.default_collate(items)
    g = torch.Generator().manual_seed(args.seed)
    torch.set_grad_enabled(False)
    print(f"{args.items} items of {cfg.data['type']} (seed {args.seed}) x {args.draws} (timestep, noise) draws each")
    print("| model | loss mean (standard error) | t < 25% | 25-50% | 50-75% | >= 75% of the draw |")
    print("|---|---|---:|---:|---:|---:|")
    draws = None
    for path in args.models:
        model, ckpt = load_model(path)
        model.float().eval()
        objective = make_objective(ckpt.family, model.config, cfg.train.flow_shift)
        x0, cond, _ = model_inputs(ckpt.family, batch, getattr(model.config, "num_classes", 0))
        if draws is None:  # the same timesteps and noise for every model
            draws = [(objective.sample_timesteps(x0.shape[0], x0.device, g), torch.randn(x0.shape, generator=g))
                     for _ in range(args.draws)]
        losses, times = [], []
        for t, noise in draws:
            x_t = objective.q_sample(x0, t, noise)
            out = torch.cat([model(x_t[i:i + args.batch], objective.model_timesteps(t[i:i + args.batch]),
                                   **{k: v[i:i + args.batch] for k, v in cond.items()})
                             for i in range(0, x0.shape[0], args.batch)])
            losses.append(objective.losses(out, x0, x_t, t, noise)["loss"])
            times.append(t.float())
        loss, time = torch.cat(losses), torch.cat(times)
        per_item = loss.view(args.draws, -1).mean(0)
        se = float(per_item.std() / math.sqrt(per_item.numel()))
        edges = torch.quantile(time, torch.tensor([0.25, 0.5, 0.75]))
        bins = torch.bucketize(time, edges, right=True)
        cells = " | ".join(f"{float(loss[bins == b].mean()):.4f}" for b in range(4))
        print(f"| {os.path.basename(path)} | {float(loss.mean()):.4f} ({se:.4f}) | {cells} |", flush=True)


if __name__ == "__main__":
    main()

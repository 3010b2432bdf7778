"""Many samples for evaluation (FID / FVD over thousands of samples), on one process or many.

    skipdit sample-many CKPT --num-samples 2048 --labels all --out evals/ucf101 --cache-intervals 1 2 3
    torchrun --nproc_per_node 8 -m skipdit_core sample-many CKPT ...          # 8 GPUs (or CPU processes)
    accelerate launch --num_processes 8 -m skipdit_core sample-many CKPT ...

Under `torchrun` / `accelerate launch` (WORLD_SIZE > 1 in the environment) every process joins one
process group (NCCL on GPUs, gloo on the CPU) and takes its share; alone it runs everything.

What a sample is does not depend on the number of processes: the samples are cut into batches of
`batch_size` consecutive indices, batch g is drawn from seed `seed + g` and handed to process
g % WORLD_SIZE. So 1 and 8 processes write the same files (for one batch size).

Layout of `out` (one folder per setting; "uncached" is n = 1):

    <setting>/000000.npy ...  one file per sample, written atomically (temporary file, then rename):
                              uint8 frames (F, H, W, 3) for video, (H, W, 3) for images; the float32
                              latents for a latent model decoded by no VAE
    <setting>.npz             every sample in index order: `arr_0` (N, [F,] H, W, 3), the array DiT's
                              sample_ddp.py writes and FID / FVD tools read, and `labels` (N,) if any
    summary.json              per setting: samples, wall time, samples/s, processes, Skip-Cache statistics

A file that exists is complete, so a killed run started again skips every finished batch and redoes
only those that were in flight.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .parallel import Processes
from .pipeline import Request, generate
from .skip_cache import SkipCacheConfig


@dataclass(frozen=True)
class Setting:
    """One sampling setting: its folder name and Skip-Cache config (None: uncached)."""

    name: str
    cache: Optional[SkipCacheConfig]

    @classmethod
    def of(cls, cache: Optional[SkipCacheConfig]) -> "Setting":
        if cache is None:
            return cls("uncached", None)
        name = cache.describe().replace(" ", "_").replace("->", "-").replace("=", "")
        return cls(name, cache)


def batches(num_samples: int, batch_size: int) -> list[range]:
    """The sample indices of each batch: consecutive, `batch_size` each (the last may be short)."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"--num-samples and --batch-size must be at least 1, got {num_samples} and {batch_size}")
    return [range(g * batch_size, min(num_samples, (g + 1) * batch_size)) for g in range(math.ceil(num_samples / batch_size))]


def batch_request(base: Request, indices: range, seed: int, labels: Optional[Sequence[int]]) -> Request:
    """The request of one batch: its seed, the labels of its samples (sample i gets labels[i % len]) and the
    rows of a multi-prompt text file (sample i gets prompt i % P; single-row tensors are shared)."""
    label = [labels[i % len(labels)] for i in indices] if labels else base.label
    text = base.text
    prompts = base.text["prompt_embeds"].shape[0] if "prompt_embeds" in base.text else 1
    if prompts > 1:
        rows = torch.tensor([i % prompts for i in indices])
        text = {k: v[rows] if v.shape[0] == prompts else v for k, v in base.text.items()}
    return replace(base, batch=len(indices), seed=seed, label=label, text=text)


def sample_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.npy"


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` a hidden temporary beside `path`, then rename it to `path`: `path` either does not
    exist or is complete (a killed write leaves a .<name>.<pid>.tmp<suffix>)."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def run(
    model,
    base: Request,
    settings: Sequence[Setting],
    out: Path,
    num_samples: int,
    batch_size: int = 1,
    labels: Optional[Sequence[int]] = None,
    to_array: Callable[[torch.Tensor], np.ndarray] = lambda s: s.float().cpu().numpy(),
    processes: Processes = Processes(),
    progress: bool = True,
    about: Optional[dict] = None,
) -> dict:
    """Sample every setting's share of this process, then (main process) write each setting's .npz and
    summary.json; returns the summary. `to_array(sample)` turns one sample (batch 1, family layout) into
    what is saved; `about`: what the summary says of the run besides (checkpoint, sampler...)."""
    out = Path(out)
    groups = batches(num_samples, batch_size)
    mine = [g for g in range(len(groups)) if g % processes.world == processes.rank]
    summary = {**(about or {}), "num_samples": num_samples, "batch_size": batch_size, "processes": processes.world,
               "seed": base.seed, "labels": list(labels) if labels else None, "settings": []}
    for setting in settings:
        folder = out / setting.name
        if processes.main:
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob(".*.tmp.npy"):  # writes a killed run left unfinished
                stale.unlink()
        processes.barrier()
        todo = [g for g in mine if not all(sample_path(folder, i).exists() for i in groups[g])]
        stats, bound, made = None, 1.0, 0
        bar = None
        if progress and processes.main and todo:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc=f"{setting.name} (main process's batches)", unit="batch")
        start = time.perf_counter()
        for g in todo:
            indices = groups[g]
            result = generate(model, batch_request(base, indices, base.seed + g, labels), setting.cache)
            for j, i in enumerate(indices):
                array = to_array(result.sample[j:j + 1])
                replace_atomically(sample_path(folder, i), lambda tmp: np.save(tmp, array))
            made += len(indices)
            stats, bound = stats or result.stats, result.speedup_bound
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - start
        shares = processes.gather({"made": made, "seconds": seconds, "stats": stats, "bound": bound})
        done = [s for s in shares if s["made"]]
        wall = max(s["seconds"] for s in shares)
        made_all = sum(s["made"] for s in shares)
        row = {"setting": setting.name, "skip_cache": setting.cache.describe() if setting.cache else None,
               "samples": num_samples, "made_this_run": made_all, "already_complete": num_samples - made_all,
               "wall_seconds": round(wall, 3), "samples_per_second": round(made_all / wall, 4) if made_all and wall > 0 else None,
               "npz": str(out / f"{setting.name}.npz")}
        if done and done[0]["stats"] is not None:
            first = done[0]["stats"]  # every batch of a setting has the same schedule
            row.update(full_steps=first.full_steps, cached_steps=first.cached_steps, empty_steps=first.empty_steps,
                       block_compute=round(first.blocks_run / first.blocks_uncached, 4),
                       speedup_bound=round(done[0]["bound"], 4), per_trajectory=first.summary())
        summary["settings"].append(row)
        processes.barrier()  # every file of this setting is written
        if processes.main:
            write_npz(folder, out / f"{setting.name}.npz", num_samples, labels)
    if processes.main:
        replace_atomically(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=1) + "\n"))
    processes.barrier()
    return summary


def write_npz(folder: Path, path: Path, num_samples: int, labels: Optional[Sequence[int]]) -> None:
    """All samples of `folder` in index order into one .npz (`arr_0`, and `labels` when class-conditional)."""
    missing = [i for i in range(num_samples) if not sample_path(folder, i).exists()]
    if missing:
        raise RuntimeError(f"{folder}: {len(missing)} of {num_samples} samples missing (first: {sample_path(folder, missing[0]).name})")
    arrays = np.stack([np.load(sample_path(folder, i)) for i in range(num_samples)])
    extra = {"labels": np.array([labels[i % len(labels)] for i in range(num_samples)], dtype=np.int64)} if labels else {}
    replace_atomically(path, lambda tmp: np.savez(tmp, arr_0=arrays, **extra))

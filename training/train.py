"""Train a Skip-DiT (or vanilla) DiT / Latte / Latte T2V, or a Wan (rectified flow), with accelerate.

    python -m training.train --config training/configs/demo-skip-latte.yaml            # one process
    accelerate launch -m training.train --config ... [--resume] [--set train.max_steps=10]
    accelerate launch --multi_gpu --num_processes 8 -m training.train --config ...       # DDP
    accelerate launch --config_file training/accelerate/fsdp-wan.yaml -m training.train --config ...  # FSDP (Wan 14B)
    (mixed precision, FSDP or DeepSpeed: through `accelerate config` / launch flags; FSDP: training/sharding.py)

A run directory (`train.output_dir`) holds:
    config.yaml                  the resolved recipe
    log.jsonl                    one line per log interval: step, loss, mse, vb, lr, samples/s
    checkpoints/step-00000500/   ema.safetensors, model.safetensors (family + config in the metadata:
                                 what `skipdit_core.load_model` and the ComfyUI nodes read), trainer.json,
                                 resume/ (accelerate state: optimizer, RNG, ...); with moving shapes as text
                                 (fixed class embeddings), class-embeds.safetensors and text-<class>.safetensors
                                 (`skipdit_core.shape_prompts`): the states to sample each class with;
                                 under FSDP resume/ holds the sharded model and optimizer and resume/ema/ the
                                 sharded EMA (torch.distributed.checkpoint); the .safetensors are gathered
    checkpoints/latest           the name of the newest complete step folder
    samples/                     sample videos of the EMA model (sample.every)

A step folder is written under a temporary name and renamed when complete, and `latest` is replaced
atomically after that, so a crash (even SIGKILL) mid-save leaves the previous checkpoint intact.
`--resume` continues from `latest`: weights, optimizer, EMA, RNG state and the position in the data.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict
from typing import Optional

import torch
import yaml

from skipdit_core import models
from skipdit_core.loading import DTYPES, inspect_checkpoint, save_safetensors
from skipdit_core.shape_prompts import save_class_embeds

from .config import TrainConfig, load_config
from .convert import calibrate_pass_through, exact_pass_through
from .data import build_dataset
from .objective import make_objective
from .sharding import (
    ShardedEMA, checkpoint_blocks, fsdp_over_gloo, fsdp_requested, gather_full_state, reduce_gradients_in_fp32,
)

SKIP_PREFIXES = ("skip_norms.", "skip_linears.")


# ----------------------------------------------------------------------------------------------
# Model: build, convert a pretrained vanilla model, choose the trainable parameters
# ----------------------------------------------------------------------------------------------

def build_model(cfg: TrainConfig, log=print) -> torch.nn.Module:
    """The model of `cfg.model`; with init_from, initialised from that checkpoint. A vanilla checkpoint
    loaded into a Skip-DiT config gets freshly initialised skip branches (the paper's conversion)."""
    return _build_model(cfg, log)[0]


def _build_model(cfg: TrainConfig, log=print) -> tuple[torch.nn.Module, list[str]]:
    """(model, names of the skip-branch tensors the init_from checkpoint lacked)."""
    spec = cfg.model
    if spec.init_from is None:
        config = models.make_config(spec.family, spec.config, spec.preset)
        return models.build_model(spec.family, config), []
    source = resolve_init_from(spec.init_from)
    ckpt = inspect_checkpoint(source, spec.family)
    if ckpt.family != spec.family:
        raise ValueError(f"{source}: a {ckpt.family} checkpoint, but model.family is {spec.family}")
    config = models.make_config(spec.family, spec.config, spec.preset, base=ckpt.config)
    has_branches = any(k.startswith(SKIP_PREFIXES) for k in ckpt.state_dict)
    if has_branches and ckpt.skip_fusion is not None and ckpt.skip_fusion != getattr(config, "skip_fusion", None):
        raise ValueError(f"{source}: its skip branches were trained with the {ckpt.skip_fusion!r} fusion, but "
                         f"model.config.skip_fusion is {config.skip_fusion!r}: the same weights would compute another "
                         f"model (set skip_fusion: {ckpt.skip_fusion})")
    model = models.build_model(spec.family, config)
    expected, sd = model.state_dict(), ckpt.state_dict
    new = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if unexpected or any(not k.startswith(SKIP_PREFIXES) for k in new):
        raise ValueError(
            f"{source}: does not fit the configured {spec.family} model: "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}, missing non-skip keys "
            f"{[k for k in new if not k.startswith(SKIP_PREFIXES)][:5]}"
        )
    for k in sd:
        if tuple(sd[k].shape) != tuple(expected[k].shape):
            raise ValueError(f"{source}: shape mismatch at {k}: model {tuple(expected[k].shape)}, file {tuple(sd[k].shape)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=False)
    log(f"initialised from {source}: {len(sd)} tensors loaded"
        + (f", {len(new)} skip-branch tensors new (vanilla -> Skip-DiT)" if new else ""))
    return model, new


def start_pass_through(model: torch.nn.Module, cfg: TrainConfig, dataset, objective) -> list[tuple[float, float]]:
    """model.skip_init = pass_through (training/convert.py). With the residual fusion the branches start at exactly
    zero (returns []). With the paper's: calibrate them on the dataset's first batch_size items, noised by a generator
    of the run's seed, the same batch on every process (the batch is drawn on the CPU, the forward runs where the
    model is); returns [(scale, shift)] per branch."""
    if model.skip_fusion == "residual":
        exact_pass_through(model)
        return []
    items = [dataset[i] for i in range(min(cfg.train.batch_size, len(dataset)))]
    batch = torch.utils.data.default_collate(items)
    x0, cond, _ = model_inputs(cfg.model.family, batch, getattr(model.config, "num_classes", 0))
    g = torch.Generator().manual_seed(cfg.train.seed)
    t = objective.sample_timesteps(x0.shape[0], x0.device, g)
    x_t = objective.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=x0.dtype))
    device = next(model.parameters()).device
    x_t, t = x_t.to(device), objective.model_timesteps(t).to(device)
    cond = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
    return calibrate_pass_through(model, lambda: model(x_t, t, **cond))


def resolve_init_from(path: str) -> str:
    """A checkpoint file, or a training run folder: then the EMA weights of its latest checkpoint
    (how stage 2 starts from stage 1)."""
    if os.path.isdir(path):
        latest = latest_checkpoint(path)
        if latest is None:
            raise ValueError(f"init_from {path}: a folder without checkpoints/latest (not a finished training run)")
        return os.path.join(latest, "ema.safetensors")
    return path


def select_trainable(model: torch.nn.Module, trainable: str) -> list[str]:
    """Freeze what the stage does not train; returns a one-line description per group for the log.
    "skip_branches" (stage 1 of the conversion): only skip_norms.* and skip_linears.*."""
    if trainable == "skip_branches":
        if not getattr(model, "skip_norms", None):
            raise ValueError("train.trainable = skip_branches needs a Skip-DiT model (model.config.skip: true)")
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(SKIP_PREFIXES))
    elif trainable != "all":
        raise ValueError(f"train.trainable must be 'all' or 'skip_branches', got {trainable!r}")
    # Fixed sin-cos tables are parameters of the released layout but never trained.
    for name in ("pos_embed", "temp_embed"):
        if isinstance(getattr(model, name, None), torch.nn.Parameter):
            getattr(model, name).requires_grad_(False)
    groups = {"trained": [0, 0], "frozen": [0, 0]}
    for p in model.parameters():
        g = groups["trained" if p.requires_grad else "frozen"]
        g[0] += 1
        g[1] += p.numel()
    return [f"{k}: {n} tensors, {c / 1e6:.2f}M parameters" for k, (n, c) in groups.items()]


# ----------------------------------------------------------------------------------------------
# One training step's inputs per family
# ----------------------------------------------------------------------------------------------

def model_inputs(family: str, batch: dict, num_classes: int) -> tuple[torch.Tensor, dict, int]:
    """(x0 in the model's layout, conditioning keyword arguments, channel dim of the output).

    Batches hold "x" as (B, C, H, W) images or (B, F, C, H, W) videos (Latte's layout)."""
    x = batch["x"]
    if family == "dit":
        if x.dim() != 4:
            raise ValueError(f"DiT trains on images (B, C, H, W); the data gives {tuple(x.shape)}")
        return x, {"y": batch["label"]}, 1
    if x.dim() != 5:
        raise ValueError(f"{family} trains on videos (B, F, C, H, W); the data gives {tuple(x.shape)}")
    if family == "latte":
        if num_classes > 0 and (batch["label"] < 0).any():
            raise ValueError("the model is class-conditional but the data has no labels (label -1)")
        return x, ({"y": batch["label"]} if num_classes > 0 else {}), 2
    if "prompt_embeds" not in batch:
        raise ValueError(f"{family} trains on text: the data must give prompt_embeds (text-encoder states)")
    if family == "wan":  # padding tokens are zero states for Wan (it has no attention mask)
        states, mask = batch["prompt_embeds"], batch.get("prompt_attention_mask")
        if mask is not None:
            states = states * mask[..., None].to(states.dtype)
        return x.transpose(1, 2), {"encoder_hidden_states": states}, 1  # (B, C, F, H, W)
    cond = {"encoder_hidden_states": batch["prompt_embeds"], "encoder_attention_mask": batch.get("prompt_attention_mask")}
    return x.transpose(1, 2), cond, 1  # (B, C, F, H, W)


def drop_text(cond: dict, p: float, generator: torch.Generator) -> dict:
    """Zero each sample's text states with probability p (the unconditional input of guidance: the pipeline's
    default negative is all-zero states). Masks stay: zero states with every token real, as that negative."""
    states = cond["encoder_hidden_states"]
    keep = torch.rand(states.shape[0], generator=generator, device=generator.device) >= p
    return {**cond, "encoder_hidden_states": states * keep.to(states.device, states.dtype).view(-1, 1, 1)}


def dataset_class_embeds(dataset) -> Optional[dict]:
    """The fixed per-class text states of a class-as-text dataset (MovingShapes with text_len / text_dim), to be
    saved with each checkpoint; None for other data."""
    table = getattr(dataset, "class_embeds", None)
    if table is None:
        return None
    return {"table": table, "seed": dataset.seed, "classes": list(dataset.classes), "video": dataset.num_frames > 1}


# ----------------------------------------------------------------------------------------------
# EMA and checkpoints
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model, over trainable parameters (frozen ones are equal)."""
    ema_params = dict(ema.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            ema_params[name].mul_(decay).add_(p.detach().to(ema_params[name].dtype), alpha=1.0 - decay)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


def latest_checkpoint(output_dir: str) -> Optional[str]:
    pointer = os.path.join(output_dir, "checkpoints", "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(output_dir, "checkpoints", f.read().strip())
    if not os.path.isfile(os.path.join(path, "trainer.json")):
        raise RuntimeError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def drop_log_rows_after(log_file: str, step: int) -> None:
    if os.path.exists(log_file):
        with open(log_file) as f:
            rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        _write_atomic(log_file, "".join(rows))


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(accelerator, model, ema, cfg: TrainConfig, step: int, class_embeds: Optional[dict] = None) -> str:
    """All processes call this (accelerate saves its state; sharded weights and EMA are gathered for the exported
    files); the main process writes the files. `ema`: the EMA module, or a ShardedEMA under FSDP.
    class_embeds ({"table", "seed", "classes", "video"}, `dataset_class_embeds`) are written beside them."""
    root = os.path.join(cfg.train.output_dir, "checkpoints")
    name = f"step-{step:08d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".{name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(os.path.join(tmp, "resume"))
    dtype = DTYPES[cfg.train.save_dtype] if cfg.train.save_dtype else None
    if isinstance(ema, ShardedEMA):  # FSDP: the EMA's shards beside accelerate's, then whole tensors for the files
        ema.save(os.path.join(tmp, "resume", "ema"))
        state = gather_full_state(model.state_dict(), accelerator.is_main_process, dtype)
        ema_state = ema.export(state, accelerator.is_main_process, dtype)
    else:
        state = accelerator.get_state_dict(model)
        ema_state = ema.state_dict()
    if accelerator.is_main_process:
        family, config = cfg.model.family, accelerator.unwrap_model(model).config
        save_safetensors(state, os.path.join(tmp, "model.safetensors"), family, config, dtype)
        save_safetensors(ema_state, os.path.join(tmp, "ema.safetensors"), family, config, dtype)
        if class_embeds is not None:  # the fixed "prompts" of a class-as-text dataset, beside the weights
            save_class_embeds(tmp, class_embeds["table"], class_embeds["seed"], class_embeds["classes"],
                              class_embeds["video"])
        _write_atomic(os.path.join(tmp, "trainer.json"), json.dumps({"step": step, "config": cfg.to_dict()}, indent=1))
        shutil.rmtree(final, ignore_errors=True)  # a leftover of a run that crashed before `latest` moved
        os.replace(tmp, final)
        _write_atomic(os.path.join(root, "latest"), name)
        steps = sorted(d for d in os.listdir(root) if d.startswith("step-"))
        for old in steps[:-cfg.train.keep_checkpoints]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume(accelerator, path: str, ema=None) -> int:
    """Load weights, optimizer, RNG and the full-precision EMA (registered for checkpointing; a ShardedEMA from
    resume/ema/) from `path`."""
    accelerator.load_state(os.path.join(path, "resume"))
    if isinstance(ema, ShardedEMA):
        ema.load(os.path.join(path, "resume", "ema"))
    with open(os.path.join(path, "trainer.json")) as f:
        return int(json.load(f)["step"])


# ----------------------------------------------------------------------------------------------
# Samples during training
# ----------------------------------------------------------------------------------------------

def sample_model(accelerator, model, ema, cfg: TrainConfig) -> Optional[torch.nn.Module]:
    """The EMA model to sample from on the main process (None elsewhere). Under FSDP it is gathered first: all
    processes must call this, and the main process then holds a whole model."""
    if not isinstance(ema, ShardedEMA):
        return ema
    main = accelerator.is_main_process
    state = ema.export(gather_full_state(model.state_dict(), main), main)
    if not main:
        return None
    module = models.build_model(cfg.model.family, accelerator.unwrap_model(model).config)
    module.load_state_dict(state)
    return module.float().requires_grad_(False).eval().to(accelerator.device)


def write_samples(ema, cfg: TrainConfig, step: int, example: dict, log, class_embeds: Optional[dict] = None) -> None:
    """Sample videos / images of the EMA model (pixel-space models; latent models save the latents). Text models
    of a class-as-text dataset sample each of sample.labels from its class embedding, others the first example's text."""
    from skipdit_core.media import write_png, write_video
    from skipdit_core.pipeline import Request, generate, to_frames

    family, mc, sc = cfg.model.family, ema.config, cfg.sample
    out_dir = os.path.join(cfg.train.output_dir, "samples")
    os.makedirs(out_dir, exist_ok=True)
    x = example["x"]
    frames = (sc.frames or getattr(mc, "num_frames", None) or getattr(mc, "video_length", None)
              or (x.shape[1] if x.dim() == 5 else 1))  # Wan's config has no frame count: the data's
    size = sc.size or x.shape[-1]
    text = {}
    if family in ("latte_t2v", "wan"):
        text = {"prompt_embeds": example["prompt_embeds"][:1]}
    has_labels = getattr(mc, "num_classes", 0) > 0
    class_texts = class_embeds is not None and family in ("latte_t2v", "wan")  # classes given as fixed "prompts"
    shift = cfg.train.flow_shift if family == "wan" else None  # sampled at the shift it was trained with
    for label in (sc.labels if has_labels or class_texts else [None]):
        if class_texts:
            text = {"prompt_embeds": class_embeds["table"][label][None]}
        req = Request(family, label=None if class_texts else label, text=text, frames=frames, size=size,
                      sampler=sc.sampler, steps=sc.steps, guidance=sc.guidance, seed=cfg.train.seed, shift=shift)
        result = generate(ema, req)
        name = os.path.join(out_dir, f"step-{step:08d}" + (f"-class{label}" if label is not None else ""))
        if mc.in_channels not in (1, 3):
            from safetensors.torch import save_file
            save_file({"latents": result.sample.contiguous()}, name + ".safetensors")
            continue
        pixels = to_frames(family, result.sample).clamp(-1, 1)
        if family == "dit":
            write_png(name + ".png", pixels[0])
        else:
            write_video(name + ".mp4", pixels, fps=sc.fps)
    log(f"step {step}: samples written to {out_dir}")


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, resume_run: bool = False) -> dict:
    """Run the recipe; returns {"step", "loss", "checkpoint"} of the last optimizer step."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedType, GradientAccumulationPlugin, set_seed
    from tqdm.auto import tqdm

    tc = cfg.train
    # Several processes and no GPU (`accelerate launch --multi_gpu` / torchrun on a CPU box): gloo on
    # the CPU, instead of each process silently training alone; an FSDP launch stays FSDP (training/sharding.py).
    cpu_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    if cpu_processes and fsdp_requested():
        fsdp_over_gloo()
    accelerator = Accelerator(
        cpu=cpu_processes,
        mixed_precision=tc.mixed_precision,
        # Sync exactly every grad_accum_steps micro-batches (not at epoch ends), so a step is a step.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=tc.grad_accum_steps, sync_with_dataloader=False),
        # Shuffling seeded by (seed, epoch): with skip_first_batches, a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    log = accelerator.print
    set_seed(tc.seed, device_specific=True)
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if sharded:  # FSDP2 warns that a block returns a view (Wan's blocks end in a flatten): an in-place op on it would
        # skip its pre-backward hook, and the U-stack never changes a block's output in place
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        if reduce_gradients_in_fp32(accelerator.state.fsdp_plugin):
            log(f"FSDP: {accelerator.mixed_precision} compute, gradients reduced in float32")

    model, new_skip = _build_model(cfg, log)
    dataset = build_dataset(dict(cfg.data))
    objective = make_objective(cfg.model.family, model.config, tc.flow_shift)
    if cfg.model.skip_init == "pass_through":
        if not new_skip:
            raise ValueError(f"model.skip_init = pass_through starts new skip branches, but {cfg.model.init_from!r} "
                             "gives the model all its tensors (set model.skip_init: paper, or init_from a vanilla model)")
        if model.skip_fusion != "residual":  # the paper's fusion calibrates with a forward on the run's device
            model.to(accelerator.device)  # (a GPU: 14B in seconds); the residual one just zeroes the Linears
        stats = start_pass_through(model, cfg, dataset, objective)
        log("skip branches started as an exact pass-through (residual fusion, Linear at zero)" if not stats else
            f"skip branches started as pass-through, calibrated on {min(tc.batch_size, len(dataset))} items: "
            f"scale {min(s for s, _ in stats):.3g}..{max(s for s, _ in stats):.3g}")
    groups = select_trainable(model, tc.trainable)
    num_classes = getattr(model.config, "num_classes", 0)
    # The EMA: a whole float32 copy, or under FSDP a sharded one made from the sharded model below.
    ema = None if sharded else copy.deepcopy(model).float().requires_grad_(False).eval()
    if tc.activation_checkpointing:
        if sharded and accelerator.state.fsdp_plugin.activation_checkpointing:
            log("activation checkpointing: accelerate's FSDP plugin wraps the blocks (fsdp_activation_checkpointing)")
        else:
            log(f"activation checkpointing of {checkpoint_blocks(model)} blocks")
    # (no list of the parameters is kept: under FSDP it would keep every whole tensor alive beside the shards)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc.lr,
                                  weight_decay=tc.weight_decay)

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=tc.batch_size, shuffle=True, drop_last=True, num_workers=tc.num_workers,
        generator=torch.Generator().manual_seed(tc.seed),
    )
    if len(loader) == 0:
        raise ValueError(f"the data has {len(dataset)} items, fewer than one batch of {tc.batch_size} per process")
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP has swapped in sharded parameters
    if sharded:
        ema = ShardedEMA(model)  # saved and resumed beside accelerate's state (save_checkpoint, resume)
    else:
        ema.to(accelerator.device)
        # The EMA joins accelerate's state in float32 (the exported ema.safetensors may be fp16).
        accelerator.register_for_checkpointing(ema)
    class_embeds = dataset_class_embeds(dataset)

    step, checkpoint = 0, None
    if resume_run:
        path = latest_checkpoint(tc.output_dir)
        if path is None:
            log(f"--resume: no checkpoint in {tc.output_dir}, starting from step 0")
        else:
            step, checkpoint = resume(accelerator, path, ema), path
            log(f"resumed from {path} at step {step}")
            if accelerator.is_main_process:  # rows logged after that save belong to the lost steps
                drop_log_rows_after(os.path.join(tc.output_dir, "log.jsonl"), step)
    if accelerator.is_main_process:
        os.makedirs(tc.output_dir, exist_ok=True)
        with open(os.path.join(tc.output_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    unwrapped = accelerator.unwrap_model(model)
    total = sum(p.numel() for p in unwrapped.parameters())
    log(f"{cfg.model.family} {type(unwrapped).__name__}: {total / 1e6:.2f}M parameters, "
        f"skip branches: {'yes' if getattr(unwrapped, 'skip_norms', None) else 'no'}; stage {tc.trainable!r}: {'; '.join(groups)}")
    global_batch = tc.batch_size * accelerator.num_processes * tc.grad_accum_steps
    log(f"{accelerator.num_processes} process(es) on {accelerator.device}{' (FSDP)' if sharded else ''}, "
        f"mixed precision {accelerator.mixed_precision}, "
        f"global batch {global_batch} ({tc.batch_size} x {accelerator.num_processes} x {tc.grad_accum_steps} accumulated), "
        f"{len(dataset)} items, {len(loader)} batches per epoch per process")

    # Position in the data: micro-batches already consumed.
    micro = step * tc.grad_accum_steps
    epoch, skip_batches = divmod(micro, len(loader))
    bar = tqdm(total=tc.max_steps, initial=step, disable=not accelerator.is_local_main_process, desc="train")
    log_file = os.path.join(tc.output_dir, "log.jsonl")
    new_window = lambda: {"loss": 0.0, "mse": 0.0, "vb": 0.0, "n": 0, "t0": time.perf_counter(), "steps": 0}  # noqa: E731
    window = new_window()
    example, last_loss = None, math.nan
    model.train()
    while step < tc.max_steps:
        loader.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip_batches) if skip_batches else loader
        skip_batches = 0
        for batch in batches:
            if example is None:
                example = {k: v[:1].cpu() for k, v in batch.items()}
            x0, cond, channel_dim = model_inputs(cfg.model.family, batch, num_classes)
            # Noise and timesteps from a generator of (seed, process, micro-batch): resumable exactly.
            g = torch.Generator(device=x0.device).manual_seed(
                tc.seed * 1_000_003 + accelerator.process_index * 7919 + micro)
            t = objective.sample_timesteps(x0.shape[0], x0.device, g)
            noise = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
            if tc.text_dropout:  # drawn after t and noise: the streams of a run without dropout are unchanged
                cond = drop_text(cond, tc.text_dropout, g)
            micro += 1
            x_t = objective.q_sample(x0, t, noise)
            with accelerator.accumulate(model):  # (prepare() already runs the forward under autocast)
                terms = objective.losses(model(x_t, objective.model_timesteps(t), **cond), x0, x_t, t, noise)
                loss = terms["loss"].mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if tc.grad_clip:
                        accelerator.clip_grad_norm_(params, tc.grad_clip)
                    lr = tc.lr * min(1.0, (step + 1) / tc.warmup_steps) if tc.warmup_steps else tc.lr
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for k in ("loss", "mse", "vb"):
                window[k] += terms[k].detach().mean().item()
            window["n"] += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            decay = ema_decay_at(step, tc.ema_decay, tc.ema_warmup)
            if sharded:
                ema.update(model, decay)
            else:
                update_ema(ema, accelerator.unwrap_model(model), decay)
            window["steps"] += 1
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.max_steps:
                seconds = time.perf_counter() - window["t0"]
                stats = torch.tensor([window[k] / window["n"] for k in ("loss", "mse", "vb")], device=accelerator.device)
                stats = accelerator.reduce(stats, reduction="mean").tolist()
                last_loss = stats[0]
                row = {"step": step, "loss": stats[0], "mse": stats[1], "vb": stats[2], "lr": lr,
                       "samples_per_s": window["steps"] * global_batch / max(seconds, 1e-9), "epoch": epoch}
                bar.set_postfix(loss=f"{stats[0]:.4f}", lr=f"{lr:.2e}")
                if accelerator.is_main_process:
                    with open(log_file, "a") as f:
                        f.write(json.dumps(row) + "\n")
                window = new_window()
            if step % tc.save_every == 0 or step == tc.max_steps:
                checkpoint = save_checkpoint(accelerator, model, ema, cfg, step, class_embeds)
                bar.write(f"step {step}: checkpoint {checkpoint}") if accelerator.is_local_main_process else None
            if cfg.sample.every and step % cfg.sample.every == 0:
                module = sample_model(accelerator, model, ema, cfg)  # all processes: gathered under FSDP
                if accelerator.is_main_process:
                    write_samples(module, cfg, step, example, bar.write, class_embeds)
            if step >= tc.max_steps:
                break
        else:
            epoch += 1
    bar.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    log(f"done: step {step}, loss {last_loss:.4f}, checkpoint {checkpoint}")
    return {"step": step, "loss": last_loss, "checkpoint": checkpoint}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a recipe of training/configs/")
    parser.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoints/latest")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field (repeatable), e.g. --set train.max_steps=10")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    train(cfg, resume_run=args.resume)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What training/train.py needs under FSDP (accelerate's FSDP2, `training/accelerate/fsdp-wan.yaml`), and activation
checkpointing of the blocks.

Under FSDP every process holds a shard of each parameter (DTensors), so three things of the loop change:

- the EMA is sharded like the parameters (`ShardedEMA`: a float32 DTensor copy of each trainable parameter's shard,
  updated locally, no communication), saved and resumed with torch.distributed.checkpoint next to accelerate's
  state (`resume/ema/`);
- the exported `model.safetensors` / `ema.safetensors` are gathered one tensor at a time (`gather_full_state`), the
  main process keeping each on the CPU in the export dtype: peak accelerator memory one whole tensor;
- samples during training gather the EMA first (a whole model on the main process);
- with bf16 mixed precision, gradients are reduced in float32 (`reduce_gradients_in_fp32`).

accelerate takes its FSDP configuration only for processes with an accelerator device: CPU processes become
MULTI_CPU (DDP over gloo) and the FSDP settings are ignored. torch's FSDP2 itself runs on gloo, so on a machine
without CUDA an FSDP launch is set up as FSDP over gloo (`fsdp_over_gloo`); that is how the tests run it (2 CPU
processes), and GPU runs never take that path.
"""
from __future__ import annotations

import os
import types
from typing import Optional

import torch
from torch import nn

# Prefixes that wrappers add to parameter names (not to state-dict keys): activation checkpointing, torch.compile.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def fsdp_requested() -> bool:
    """An `accelerate launch` with an FSDP config (it sets ACCELERATE_USE_FSDP for every process)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_over_gloo() -> None:
    """Set up this process for FSDP on CPUs: accelerate's process state as for CPU processes (gloo), then marked as
    a multi-device run, so that the Accelerator made next takes the FSDP plugin from the launch's settings (for a
    MULTI_CPU state it ignores them). Relies on accelerate's shared-state layout (checked with accelerate 1.16)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True)
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"FSDP on CPUs needs several processes (accelerate launch --num_processes N); "
                           f"got a {state.distributed_type} state")
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def reduce_gradients_in_fp32(plugin) -> bool:
    """accelerate's FSDP2 mixed precision reduces gradients in the compute dtype (bf16); reduce them in float32, as
    the float32 master weights they update (torchtitan's default). Call before accelerator.prepare. True if changed."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = getattr(plugin, "mixed_precision_policy", None)
    if not isinstance(policy, MixedPrecisionPolicy) or policy.reduce_dtype in (None, torch.float32):
        return False
    plugin.mixed_precision_policy = MixedPrecisionPolicy(
        param_dtype=policy.param_dtype, reduce_dtype=torch.float32, output_dtype=policy.output_dtype,
        cast_forward_inputs=policy.cast_forward_inputs)
    return True


def canonical_name(name: str) -> str:
    """A parameter's name as in the model's state dict (wrapper prefixes removed)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@torch.no_grad()
def gather_full_state(state: dict, is_main: bool, dtype: Optional[torch.dtype] = None) -> Optional[dict]:
    """The whole tensors of a (partly) sharded state dict, on the CPU of the main process (None elsewhere). Every
    process must call it (each DTensor is all-gathered, one at a time); float tensors are cast to `dtype` if given."""
    out = {}
    for name, value in state.items():
        full = value.full_tensor() if _is_dtensor(value) else value
        if is_main:  # a copy, never a view of a live parameter
            cast = dtype if dtype is not None and full.is_floating_point() else full.dtype
            out[canonical_name(name)] = full.detach().to("cpu", cast, copy=True)
        del full
    return out if is_main else None


class ShardedEMA:
    """The EMA of an FSDP-sharded model's trainable parameters, sharded as they are: a float32 copy of each
    process's shard (DTensors with the parameters' placements). Frozen parameters are not copied: their EMA is the
    parameter itself, taken from the model when the EMA is exported."""

    def __init__(self, model: nn.Module):
        self.tensors = {canonical_name(n): p.detach().float().clone()
                        for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        """ema = decay * ema + (1 - decay) * param, shard by shard (no communication)."""
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.tensors[canonical_name(name)].mul_(decay).add_(p.detach().float(), alpha=1.0 - decay)

    def save(self, path: str) -> None:
        """Every process writes its shards (torch.distributed.checkpoint)."""
        import torch.distributed.checkpoint as dcp

        dcp.save({"ema": self.tensors}, checkpoint_id=path)

    def load(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp

        state = {"ema": self.tensors}
        dcp.load(state, checkpoint_id=path)  # in place, into this run's sharding

    def export(self, model_state: Optional[dict], is_main: bool, dtype: Optional[torch.dtype] = None) -> Optional[dict]:
        """The whole EMA model's state dict on the main process: `model_state` (the model's, gathered there by
        gather_full_state) with every trainable tensor replaced by its EMA. Collective, like gather_full_state."""
        state = model_state
        ema = gather_full_state(self.tensors, is_main, dtype)
        if not is_main:
            return None
        missing = sorted(set(ema) - set(state))
        if missing:
            raise RuntimeError(f"EMA tensors {missing[:5]} are not in the model's state dict")
        return {**state, **ema}


def checkpoint_blocks(model: nn.Module) -> int:
    """Activation checkpointing of every block in `model.blocks` (Wan's 30 / 40 blocks): their activations are
    recomputed in the backward pass instead of kept. The parameter names do not change (the forward is wrapped, not
    the module), so checkpoints, the EMA and the optimizer see the same model. Returns the number of blocks."""
    from torch.utils.checkpoint import checkpoint

    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise ValueError(f"train.activation_checkpointing checkpoints model.blocks; a {type(model).__name__} has none")

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return type(self).forward(self, *args, **kwargs)
        # The blocks draw no random numbers (no dropout), so the RNG state need not be replayed.
        return checkpoint(type(self).forward, self, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

    for block in blocks:
        block.forward = types.MethodType(forward, block)
    return len(blocks)

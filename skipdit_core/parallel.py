"""One sample over several processes (GPUs, or CPU processes with gloo): the two ways DiT serving
engines (xDiT) split a denoising step, on torch.distributed and yunchang.

- **CFG parallel** (`CFGParallel`, 2 processes): with classifier-free guidance a step evaluates the
  model on 2B rows, the conditional and the unconditional half. Each process evaluates one half and
  the halves are exchanged with one all-gather of the model output per step (B x C x [F x] H x W
  values per process).
- **Sequence parallel** (`SequenceParallel`, P processes): the image / frame tokens of every block are
  split into P contiguous slices. Everything token-wise (MLPs, norms, adaLN, the long-skip fusions,
  cross-attention to the text, Latte's temporal attention, which mixes the frames of one token
  position) runs on the local slice with no communication; self-attention over the tokens is Ulysses
  attention, with the all-to-all of yunchang (`SeqAllToAll4D`, what its `UlyssesAttention` and xDiT's
  USP use): one all-to-all turns the local tokens x all heads of q, k and v into all tokens x H / P
  heads, PyTorch's SDPA (the kernel the unsplit model calls) attends on those, and one all-to-all
  brings the output back. Per self-attention layer and process that is 4 tensors of
  (N, T / P, D) sent and received, (P - 1) / P of each leaving the process; at the end of the model one
  all-gather of the output tokens. Needs num_heads and the token count divisible by P.

Every process runs the whole sampling loop on the full latent with the same seed (so the same noise
and the same sampler draws) and gets the full model output, so all processes hold the same sample.
Skip-Cache runs unchanged under both: its decisions depend on the timestep only, so every process
decides alike; each caches its own part (its CFG half, or its token slice) of the deep state.

Launch under torchrun / accelerate launch (the process group is joined from the environment):

    torchrun --nproc_per_node 2 -m skipdit_core sample CKPT --parallel cfg --guidance 7 ...
    torchrun --nproc_per_node 4 -m skipdit_core sample CKPT --parallel sequence ...
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Processes:
    """This process's place among those launched together (torchrun / accelerate set the variables)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> "Processes":
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def join(self, device: torch.device) -> None:
        """Join the process group of the launch (once), NCCL for GPUs and gloo for the CPU."""
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def gather(self, obj) -> list:
        """`obj` of every process, in rank order (the object itself when alone)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


class CFGParallel:
    """Process `rank` of 2 evaluates half `rank` of every guided model call."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if self.world != 2:
            raise ValueError(f"CFG parallel splits a step into its conditional and unconditional halves: it needs 2 "
                             f"processes, got {self.world}")

    def half(self, x: torch.Tensor) -> torch.Tensor:
        """This process's half of a 2B-row batch (rows [rank B, (rank + 1) B))."""
        return x.chunk(2, dim=0)[self.rank]

    def join(self, half: torch.Tensor) -> torch.Tensor:
        """Both halves, in row order, on every process."""
        parts = [torch.empty_like(half) for _ in range(2)]
        dist.all_gather(parts, half.contiguous(), group=self.group)
        return torch.cat(parts, dim=0)


def _attention_layers(model: nn.Module) -> list[nn.Module]:
    """The self-attention layers of `model` that attend over the split tokens (the others are local:
    Latte's temporal attention mixes frames of one token position, cross-attention reads the text)."""
    family = getattr(model, "family", None)
    if family == "dit":
        return [block.attn for block in model.blocks]
    if family == "latte":
        return [model.blocks[i].attn for i in range(0, len(model.blocks), 2)]  # the spatial block of each pair
    if family == "latte_t2v":
        return [block.attn1 for block in model.transformer_blocks]
    if family == "hunyuan":
        return [block.attn1 for block in model.blocks]
    raise ValueError(f"sequence parallel knows the families dit, latte, latte_t2v and hunyuan, not {family!r}")


class SequenceParallel:
    """Process `rank` of P holds tokens [rank T / P, (rank + 1) T / P) of every block's input."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        try:
            from yunchang.comm.all_to_all import SeqAllToAll4D
        except ImportError as e:
            raise ImportError("sequence parallel needs yunchang: pip install 'comfyui-skipdit[parallel]'") from e
        self._all_to_all = SeqAllToAll4D
        self.group = group if group is not None else dist.group.WORLD
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def attach(self, model: nn.Module) -> nn.Module:
        """Split `model`'s tokens over the processes from now on (returns the model)."""
        heads = _attention_layers(model)[0].num_heads
        if heads % self.world:
            raise ValueError(f"sequence parallel over {self.world} processes splits the {heads} attention heads "
                             f"evenly: use a process count that divides {heads}")
        model.sequence_parallel = self
        for layer in _attention_layers(model):
            layer.sequence_parallel = self
        return model

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This process's slice of the tokens along `dim`."""
        if x.shape[dim] % self.world:
            raise ValueError(f"sequence parallel over {self.world} processes needs a token count they divide; "
                             f"this sample has {x.shape[dim]} tokens per frame (pick a size whose patch grid does)")
        return x.chunk(self.world, dim=dim)[self.rank]

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every process's slice along `dim`, in order, on every process."""
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Self-attention of local queries over all tokens: q, k, v (N, heads, T / P, hd) -> (N, heads, T / P, hd)."""
        # (N, T / P, heads, hd) --all-to-all--> (N, T, heads / P, hd): scatter the heads, gather the tokens
        q, k, v = (self._all_to_all.apply(self.group, x.transpose(1, 2).contiguous(), 2, 1, False) for x in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = self._all_to_all.apply(self.group, out.transpose(1, 2).contiguous(), 1, 2, False)  # back: (N, T / P, heads, hd)
        return out.transpose(1, 2)


def attend(layer: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A self- or cross-attention layer's attention: Ulysses when the layer is split, else PyTorch's SDPA.
    q, k, v: (N, heads, T, hd)."""
    split: Optional[SequenceParallel] = getattr(layer, "sequence_parallel", None)
    if split is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    if bias is not None:
        raise ValueError("split self-attention takes no mask")
    return split.attention(q, k, v)


def shard_tokens(model: nn.Module, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """`x` itself, or this process's slice of it along `dim` when `model`'s tokens are split."""
    split: Optional[SequenceParallel] = getattr(model, "sequence_parallel", None)
    return x if split is None else split.shard(x, dim)


def gather_tokens(model: nn.Module, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """`x` itself, or every process's slice of it along `dim` when `model`'s tokens are split."""
    split: Optional[SequenceParallel] = getattr(model, "sequence_parallel", None)
    return x if split is None else split.gather(x, dim)

"""Flow-matching sampling of Wan 2.1 / 2.2: Euler over a shifted sigma schedule.

The process is x_sigma = (1 - sigma) x0 + sigma noise, sigma in [0, 1]; the model predicts the velocity
v = noise - x0 at timestep t = sigma * 1000 (ComfyUI's `ModelSamplingDiscreteFlow` / `ModelSamplingSD3`:
`timestep(sigma) = sigma * multiplier`, multiplier 1000). So the model, and Skip-Cache's window, see timesteps
in 0..1000 as for the DDPM families.

The schedule is the uniform one, s = 1, 1 - 1/N, ..., 0, shifted towards high noise:
sigma = shift s / (1 + (shift - 1) s) (`time_snr_shift` in ComfyUI, `shift` in Wan's schedulers). For a step
count dividing 1000 this equals ComfyUI's `simple` scheduler on that model sampling. Shifts: 5.0 in Wan's own
text-to-video sampling (`generate.py`'s default `sample_shift`), the default here; ComfyUI's official templates
set ModelSamplingSD3 to 8 for Wan 2.1 T2V 1.3B and Wan 2.2 TI2V 5B and 5 for the Wan 2.2 14B experts (read from
comfyui_workflow_templates_json 0.1.50: text_to_video_wan, video_wan2_2_5B_ti2v, video_wan2_2_14B_t2v).

Euler (ComfyUI's `euler` on a CONST model): x_next = x + (sigma_next - sigma) v, one model call per step; the last
step lands on sigma = 0, where x is the model's x0. The model is never called at t = 0.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .diffusion import NUM_TRAIN_TIMESTEPS, Sampler

WAN_SHIFT = 5.0  # Wan's own text-to-video sampling
WAN_STEPS = 50  # Wan's own default sample_steps for text-to-video


def shift_sigmas(s: np.ndarray, shift: float) -> np.ndarray:
    """shift * s / (1 + (shift - 1) * s): 1 and 0 stay, the rest move towards 1 for shift > 1."""
    return shift * s / (1.0 + (shift - 1.0) * s)


def flow_sigmas(steps: int, shift: float = WAN_SHIFT) -> list[float]:
    """The N + 1 sigmas of an N-step run, from 1 down to 0 (float64 arithmetic)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"the flow shift must be positive, got {shift}")
    return [float(s) for s in shift_sigmas(np.linspace(1.0, 0.0, steps + 1), shift)]


class FlowEulerSampler(Sampler):
    """Euler over `sigmas` (descending, ending at 0). `timesteps` are sigma * 1000 (floats), the order the model
    sees them. clip_denoised clamps the x0 implied by the velocity to [-1, 1] (for pixel-space models)."""

    name = "euler"

    def __init__(self, sigmas: Sequence[float], *, channel_dim: int = 1, clip_denoised: bool = False):
        sig = [float(s) for s in sigmas]
        if len(sig) < 2 or sig[0] > 1.0 or sig[-1] < 0.0 or any(b >= a for a, b in zip(sig, sig[1:])):
            raise ValueError(f"sigmas must be strictly descending in [0, 1] with at least 2 entries, got {sig[:4]}...")
        self.sigmas = sig
        self.channel_dim, self.clip_denoised = channel_dim, clip_denoised
        self._ts = [s * NUM_TRAIN_TIMESTEPS for s in sig[:-1]]

    def __repr__(self) -> str:
        ts = [round(t, 2) for t in self._ts]
        return f"{type(self).__name__}({len(ts)} steps: {ts[:3]} ... {ts[-3:]}, flow velocity)"

    def step(self, i: int, model_output: torch.Tensor, x: torch.Tensor,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        v = model_output
        if self.clip_denoised:  # the velocity re-derived from the clamped x0
            x0 = (x - sigma * v).clamp(-1.0, 1.0)
            v = (x - x0) / sigma
        return x + (sigma_next - sigma) * v


def make_flow_sampler(name: str, steps: Optional[int] = None, shift: Optional[float] = None,
                      clip_denoised: bool = False) -> FlowEulerSampler:
    """Wan's sampler: 'euler', `steps` (default 50) over the schedule shifted by `shift` (default 5)."""
    if name != "euler":
        raise ValueError(f"Wan is a flow-matching (velocity) model: its sampler is 'euler', not {name!r}")
    return FlowEulerSampler(flow_sigmas(int(steps or WAN_STEPS), WAN_SHIFT if shift is None else float(shift)),
                            clip_denoised=clip_denoised)


__all__ = ["WAN_SHIFT", "WAN_STEPS", "shift_sigmas", "flow_sigmas", "FlowEulerSampler", "make_flow_sampler"]

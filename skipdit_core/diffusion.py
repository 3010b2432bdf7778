"""DDPM and DDIM samplers of the Skip-DiT families, model-agnostic.

A sampler calls `denoise(x, t) -> model_output` exactly once per denoising step (Skip-Cache counts
steps through these calls). `t` is a (B,) float32 tensor of ORIGINAL training timesteps 0..999: a
respaced sampler passes the original timestep, as improved-diffusion's `_WrappedModel` and the
diffusers schedulers do. `x` may have any layout, (B, C, H, W) images, (B, F, C, H, W) Latte video,
(B, C, F, H, W) Latte T2V: only a learned-variance output is split, along `channel_dim`.

Every sampler runs one update over a list of (t, t_prev) pairs: with a = alphas_cumprod[t] and
a_prev = alphas_cumprod[t_prev] (`final_alpha_cumprod`, 1.0 by default, when t_prev < 0), the step's
beta is 1 - a / a_prev, which is what improved-diffusion's respacing builds (`SpacedDiffusion`) and
what diffusers' DDPMScheduler / DDIMScheduler use. The families differ in their lists and schedules:

| family    | process (authors' code)                 | DDPM default                  | DDIM default                   |
|-----------|-----------------------------------------|-------------------------------|--------------------------------|
| dit       | improved-diffusion, eps + learned range | 250, `space_timesteps("250")` | 50, `space_timesteps("50")`    |
| latte     | same, channels on dim 2 (B, F, C, H, W) | 250, same                     | 50, same (their `create_diffusion(str(N))`) |
| latte_t2v | diffusers, linear betas (float32), eps  | 250 "leading", fixed_small    | 50 "leading", offset 0         |
| hunyuan   | diffusers, scaled_linear (float32), v   | 100 "leading", offset 1       | 50 "leading", offset 1         |

Wan (`wan`) is flow matching (velocity), sampled by Euler over a shifted schedule: `skipdit_core.flow`,
which `make_sampler("wan", "euler")` returns (timesteps sigma * 1000, so 0..1000 like the others).

`spacing="ddim"` gives improved-diffusion's "ddimN" stride (0, 20, ..., 980 for 50) instead.
Classifier-free guidance, with both halves in one batch, is `guided()`; its per-family channel
conventions are `CFG_CONVENTIONS`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Schedules and timestep lists
# ----------------------------------------------------------------------------------------------

def linear_betas(beta_start: float = 1e-4, beta_end: float = 0.02, num_timesteps: int = NUM_TRAIN_TIMESTEPS,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(T,) linspace(beta_start, beta_end). float64 for improved-diffusion, float32 as diffusers."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=dtype)


def scaled_linear_betas(beta_end: float, beta_start: float = 0.00085, num_timesteps: int = NUM_TRAIN_TIMESTEPS,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(T,) linspace(sqrt(beta_start), sqrt(beta_end)) ** 2, computed as diffusers does (float32)."""
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=dtype) ** 2


@dataclass(frozen=True, eq=False)
class Schedule:
    """The training process. alphas_cumprod: (T,) float64; prediction: "eps" or "v";
    learned_range: the model output carries C extra channels v in [-1, 1] interpolating the DDPM
    log-variance between the posterior's (v = -1) and beta's (v = 1), improved-diffusion style."""

    alphas_cumprod: torch.Tensor
    prediction: str = "eps"
    learned_range: bool = False

    def __post_init__(self):
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {self.prediction!r}")

    @classmethod
    def from_betas(cls, betas: torch.Tensor, prediction: str = "eps", learned_range: bool = False) -> "Schedule":
        """cumprod(1 - betas) in the betas' own dtype (float32 mirrors diffusers), kept as float64."""
        betas = torch.as_tensor(betas)
        return cls(torch.cumprod(1.0 - betas, dim=0).to(torch.float64), prediction, learned_range)

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])


def space_timesteps(num_timesteps: int, count: Union[int, str, Sequence[int]]) -> list[int]:
    """improved-diffusion's respacing, ascending. `count`: N (or "N"): N timesteps evenly strided over
    0..T-1 (round(k * (T-1)/(N-1)), the stride accumulated as in the original); "a,b,c" or a list:
    that many per equal section; "ddimN": range(0, T, s) with the integer stride s giving N."""
    if isinstance(count, str) and count.startswith("ddim"):
        wanted = int(count[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == wanted:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot create exactly {wanted} steps from {num_timesteps} with an integer stride")
    if isinstance(count, str):
        counts = [int(c) for c in count.split(",")]
    elif isinstance(count, int):
        counts = [count]
    else:
        counts = [int(c) for c in count]
    per, extra = divmod(num_timesteps, len(counts))
    steps, start = set(), 0
    for i, n in enumerate(counts):
        size = per + (1 if i < extra else 0)
        if not 1 <= n <= size:
            raise ValueError(f"cannot divide a section of {size} steps into {n}")
        stride = (size - 1) / (n - 1) if n > 1 else 1
        pos = 0.0
        for _ in range(n):
            steps.add(start + round(pos))
            pos += stride
        start += size
    return sorted(steps)


def diffusers_timesteps(num_steps: int, spacing: str = "leading", steps_offset: int = 0,
                        num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """diffusers' `set_timesteps(num_steps)`, descending: "leading" (the default), "linspace", "trailing"."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {num_steps}")
    if spacing == "leading":
        ratio = num_timesteps // num_steps
        return [k * ratio + steps_offset for k in reversed(range(num_steps))]
    if spacing == "linspace":
        return [int(v) for v in np.linspace(0, num_timesteps - 1, num_steps).round()[::-1]]
    if spacing == "trailing":
        return [int(v) - 1 for v in np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps))]
    raise ValueError(f"spacing must be 'leading', 'linspace' or 'trailing', got {spacing!r}")


# ----------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------

class Sampler:
    """A fixed walk over `timesteps` (original timesteps, descending, the order `denoise` sees them).
    prev_timesteps: where each step lands (default: the next entry, -1 after the last; -1 means
    `final_alpha_cumprod`). clip_denoised clamps the x0 prediction to [-1, 1] (off for latents)."""

    name = "sampler"

    def __init__(self, schedule: Schedule, timesteps: Sequence[int], prev_timesteps: Optional[Sequence[int]] = None,
                 *, channel_dim: int = 1, clip_denoised: bool = False, final_alpha_cumprod: float = 1.0):
        ts = [int(t) for t in timesteps]
        if not ts or ts[0] >= schedule.num_timesteps or ts[-1] < 0 or any(b >= a for a, b in zip(ts, ts[1:])):
            raise ValueError(f"timesteps must be strictly descending in 0..{schedule.num_timesteps - 1}, got {ts[:4]}...")
        prev = [int(p) for p in prev_timesteps] if prev_timesteps is not None else ts[1:] + [-1]
        if len(prev) != len(ts):
            raise ValueError("prev_timesteps must have one entry per timestep")
        ac = schedule.alphas_cumprod.tolist()
        self.schedule, self.channel_dim, self.clip_denoised = schedule, channel_dim, clip_denoised
        self._ts, self._prev = ts, prev
        self._alphas = [(ac[t], ac[p] if p >= 0 else float(final_alpha_cumprod)) for t, p in zip(ts, prev)]

    @property
    def timesteps(self) -> list[int]:
        """The original model timesteps, in the order `denoise` is called with them."""
        return list(self._ts)

    def __len__(self) -> int:
        return len(self._ts)

    def __repr__(self) -> str:
        ts = self._ts
        return f"{type(self).__name__}({len(ts)} steps: {ts[:3]} ... {ts[-3:]}, prediction={self.schedule.prediction!r})"

    def _split(self, out: torch.Tensor, x: torch.Tensor):
        """model output -> (prediction, learned variance values or None)."""
        c, co = x.shape[self.channel_dim], out.shape[self.channel_dim]
        if co == 2 * c:
            pred, var = out.split(c, dim=self.channel_dim)
            return pred, (var if self.schedule.learned_range else None)
        if co != c:
            raise ValueError(f"model output has {co} channels on dim {self.channel_dim}; x has {c} (expected {c} or {2 * c})")
        return out, None

    def _x0_eps(self, pred: torch.Tensor, x: torch.Tensor, a: float):
        """(x0, eps) from an eps or v prediction at alphas_cumprod a."""
        if self.schedule.prediction == "eps":
            eps = pred
            x0 = x * (1.0 / a) ** 0.5 - eps * (1.0 / a - 1.0) ** 0.5
        else:
            x0 = x * a ** 0.5 - pred * (1.0 - a) ** 0.5
            eps = pred * a ** 0.5 + x * (1.0 - a) ** 0.5
        if self.clip_denoised:  # eps re-derived from the clipped x0, as improved-diffusion's DDIM does
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x * (1.0 / a) ** 0.5 - x0) / (1.0 / a - 1.0) ** 0.5
        return x0, eps

    def step(self, i: int, model_output: torch.Tensor, x: torch.Tensor,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """x at step i (timestep `timesteps[i]`) -> x at `prev_timesteps[i]`."""
        raise NotImplementedError

    @staticmethod
    def _noise(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    @torch.no_grad()
    def sample(self, denoise: Denoise, noise: Union[torch.Tensor, Sequence[int]],
               generator: Union[torch.Generator, int, None] = None,
               callback: Optional[Callable[[int, int, int], None]] = None, *,
               device: Union[torch.device, str, None] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Run every step; return x0 with the shape of `noise`.

        noise: the initial x_T (any layout, kept in its dtype and device), or a shape to draw it
            from `generator` on `device` in `dtype`. generator: a torch.Generator on x's device, an
            int seed (a generator is made on that device), or None (the global RNG). The initial
            noise (when drawn) and then each step's noise are drawn from it in step order.
        callback(step_index, total_steps, t) is called after each step."""
        if isinstance(noise, torch.Tensor):
            x = noise
        else:
            shape = tuple(int(s) for s in noise)
            device = torch.device(device if device is not None else "cpu")
            if isinstance(generator, int):
                generator = torch.Generator(device=device).manual_seed(generator)
            x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        if isinstance(generator, int):
            generator = torch.Generator(device=x.device).manual_seed(generator)
        total = len(self._ts)
        for i, t in enumerate(self._ts):
            t_batch = torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)
            x = self.step(i, denoise(x, t_batch).to(x.dtype), x, generator)
            if callback is not None:
                callback(i, total, t)
        return x


class DDPMSampler(Sampler):
    """Ancestral sampling: x_prev = posterior mean + exp(0.5 log_var) * noise, no noise on the last
    step. log_var: learned range, frac * log(beta) + (1 - frac) * log(posterior variance) with
    frac = (v + 1) / 2, when the schedule learns it and the output has 2C channels; else the
    posterior variance (diffusers' "fixed_small", clamped at 1e-20)."""

    name = "ddpm"

    def step(self, i, model_output, x, generator=None):
        a, a_prev = self._alphas[i]
        pred, var = self._split(model_output, x)
        if self.schedule.learned_range and var is None and i < len(self._ts) - 1:
            raise ValueError("this schedule learns its variance: the model output needs 2C channels (eps, v)")
        x0, _ = self._x0_eps(pred, x, a)
        beta = 1.0 - a / a_prev
        post_var = beta * (1.0 - a_prev) / (1.0 - a)
        mean = x0 * (beta * a_prev ** 0.5 / (1.0 - a)) + x * ((1.0 - a_prev) * (1.0 - beta) ** 0.5 / (1.0 - a))
        if i == len(self._ts) - 1:
            return mean
        if var is not None:
            frac = (var + 1.0) / 2.0
            std = torch.exp(0.5 * (frac * math.log(beta) + (1.0 - frac) * math.log(max(post_var, 1e-20))))
        else:
            std = max(post_var, 1e-20) ** 0.5
        return mean + std * self._noise(x, generator)


class DDIMSampler(Sampler):
    """DDIM: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma * noise with
    sigma = eta sqrt((1 - a_prev) / (1 - a)) sqrt(1 - a / a_prev); eta = 0 (default) is deterministic.
    A learned variance, if present, is ignored."""

    name = "ddim"

    def __init__(self, *args, eta: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.eta = float(eta)

    def step(self, i, model_output, x, generator=None):
        a, a_prev = self._alphas[i]
        pred, _ = self._split(model_output, x)
        x0, eps = self._x0_eps(pred, x, a)
        sigma = self.eta * ((1.0 - a_prev) / (1.0 - a)) ** 0.5 * (1.0 - a / a_prev) ** 0.5
        x_prev = x0 * a_prev ** 0.5 + eps * max(1.0 - a_prev - sigma ** 2, 0.0) ** 0.5
        if sigma > 0:
            x_prev = x_prev + sigma * self._noise(x, generator)
        return x_prev


# ----------------------------------------------------------------------------------------------
# Families
# ----------------------------------------------------------------------------------------------

HUNYUAN_BETA_END = {"1.0": 0.03, "1.1": 0.03, "1.2": 0.02}
DEFAULT_STEPS = {("dit", "ddpm"): 250, ("latte", "ddpm"): 250, ("latte_t2v", "ddpm"): 250, ("hunyuan", "ddpm"): 100}


DEFAULT_SAMPLERS = {"wan": "euler"}  # every other family: "ddpm"


def default_sampler(family: str) -> str:
    """The sampler a family runs when none is named."""
    return DEFAULT_SAMPLERS.get(family, "ddpm")


def make_sampler(family: str, name: Optional[str] = None, steps: Optional[int] = None, *, eta: float = 0.0,
                 spacing: Optional[str] = None, steps_offset: Optional[int] = None, version: str = "1.2",
                 beta_end: Optional[float] = None, set_alpha_to_one: bool = True,
                 clip_denoised: bool = False, prediction: Optional[str] = None,
                 shift: Optional[float] = None) -> Sampler:
    """The sampler of `family` ('dit', 'latte', 'latte_t2v', 'hunyuan') named 'ddpm' or 'ddim' (None: 'ddpm'),
    or of 'wan': 'euler' (flow matching, `skipdit_core.flow`; steps default 50, `shift` default 5).

    steps: default 250 for DDPM (Hunyuan-DiT 100), 50 for DDIM. eta: DDIM only.
    dit / latte (improved-diffusion): spacing None = `space_timesteps(1000, str(steps))`, the
        authors' `create_diffusion(str(N))` for both samplers; "ddim" = "ddimN"; else a
        `space_timesteps` spec ("10,15,20").
    latte_t2v / hunyuan (diffusers): spacing "leading" (default), "linspace" or "trailing";
        steps_offset 0 (Latte-1) / 1 (Hunyuan-DiT). DDIM steps from t to t - 1000 // steps (diffusers'
        rule), DDPM to the next listed timestep; set_alpha_to_one=False makes the final a_prev
        alphas_cumprod[0]. hunyuan: beta_end, or version "1.0"/"1.1" (0.03) or "1.2" (0.02).
    prediction: "eps" or "v" in place of the family's (a model config's `prediction`).
    """
    name = name or default_sampler(family)
    if family == "wan":
        from .flow import make_flow_sampler

        if prediction not in (None, "flow"):
            raise ValueError(f"Wan predicts the flow velocity; prediction {prediction!r} does not apply")
        return make_flow_sampler(name, steps, shift, clip_denoised)
    if shift is not None:
        raise ValueError(f"a flow shift applies to Wan's flow-matching sampler, not to {family}'s {name}")
    if name not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {name!r}")
    steps = int(steps) if steps is not None else DEFAULT_STEPS.get((family, name), 50)
    if family in ("dit", "latte"):
        schedule = Schedule.from_betas(linear_betas(), "eps", learned_range=True)
        spec = str(steps) if spacing is None else (f"ddim{steps}" if spacing == "ddim" else spacing)
        timesteps, prev, final, channel_dim = space_timesteps(NUM_TRAIN_TIMESTEPS, spec)[::-1], None, 1.0, 1 + (family == "latte")
    elif family in ("latte_t2v", "hunyuan"):
        if family == "latte_t2v":
            schedule = Schedule.from_betas(linear_betas(dtype=torch.float32), "eps")
        else:
            if beta_end is None:
                if version not in HUNYUAN_BETA_END:
                    raise ValueError(f"Hunyuan-DiT version must be one of {sorted(HUNYUAN_BETA_END)}, got {version!r}")
                beta_end = HUNYUAN_BETA_END[version]
            schedule = Schedule.from_betas(scaled_linear_betas(beta_end), "v")
        offset = steps_offset if steps_offset is not None else int(family == "hunyuan")
        timesteps = diffusers_timesteps(steps, spacing or "leading", offset)
        prev = [t - NUM_TRAIN_TIMESTEPS // steps for t in timesteps] if name == "ddim" else None
        final = 1.0 if (set_alpha_to_one or name == "ddpm") else float(schedule.alphas_cumprod[0])
        channel_dim = 1
    else:
        raise ValueError(f"unknown family {family!r}: expected 'dit', 'latte', 'latte_t2v', 'hunyuan' or 'wan'")
    if prediction is not None:
        schedule = Schedule(schedule.alphas_cumprod, prediction, schedule.learned_range)
    kwargs = dict(channel_dim=channel_dim, clip_denoised=clip_denoised, final_alpha_cumprod=final)
    if name == "ddim":
        return DDIMSampler(schedule, timesteps, prev, eta=eta, **kwargs)
    return DDPMSampler(schedule, timesteps, prev, **kwargs)


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CFGConvention:
    """cond_first: the doubled batch holds the conditional half first (else unconditional first);
    channel_dim: the channel axis; guided_channels: how many leading channels are guided (None:
    all; "eps": as many as x has, i.e. the eps half of a learned-variance output), the others taken
    from the conditional half; drop_variance: "before" / "after" guidance
    the output's second half of channels is dropped (when it has 2x x's channels), None keeps it."""

    cond_first: bool
    channel_dim: int
    guided_channels: Union[int, str, None]
    drop_variance: Optional[str]


CFG_CONVENTIONS = {
    # DiT sample.py / forward_with_cfg: labels [y, null]; `eps, rest = out[:, :3], out[:, 3:]`.
    "dit": CFGConvention(cond_first=True, channel_dim=1, guided_channels=3, drop_variance=None),
    # Latte class-to-video forward_with_cfg: labels [y, null]; out[:, :, :4] guided on (B, F, C, H, W),
    # the eps channels of its 4-channel latents; a pixel-space (3-channel) Latte guides its 3.
    "latte": CFGConvention(cond_first=True, channel_dim=2, guided_channels="eps", drop_variance=None),
    # Latte T2V pipeline: prompts [negative, prompt]; all channels guided, then the variance dropped.
    "latte_t2v": CFGConvention(cond_first=False, channel_dim=1, guided_channels=None, drop_variance="after"),
    # Hunyuan-DiT pipeline: prompts [negative, prompt]; variance dropped, then guided.
    "hunyuan": CFGConvention(cond_first=False, channel_dim=1, guided_channels=None, drop_variance="before"),
    # Wan: uncond + s * (cond - uncond) on the velocity, no variance channels; the pair's order is ours.
    "wan": CFGConvention(cond_first=False, channel_dim=1, guided_channels=None, drop_variance=None),
}


def guided(denoise_batch: Denoise, guidance_scale: Optional[float],
           convention: Union[str, CFGConvention]) -> Denoise:
    """Turn a batched model call into the sampler's `denoise(x, t)`, one `denoise_batch` call per step.

    With guidance_scale > 1, denoise_batch gets cat([x, x]) and cat([t, t]) (2B rows: the caller
    attaches conditional / unconditional inputs in the convention's order, `cond_first`) and the
    halves are combined as uncond + s * (cond - uncond) on the convention's channels. With
    guidance_scale None or <= 1 (the reference pipelines' `guidance_scale > 1` test) it gets x
    itself (B rows, conditional inputs). The result has 2C channels for dit/latte (eps, variance
    of the conditional half), C for latte_t2v/hunyuan."""
    conv = CFG_CONVENTIONS[convention] if isinstance(convention, str) else convention
    dim = conv.channel_dim

    def drop(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[dim]
        return out.narrow(dim, 0, c) if out.shape[dim] == 2 * c else out

    if guidance_scale is None or guidance_scale <= 1:
        def denoise(x, t):
            out = denoise_batch(x, t)
            return drop(out, x) if conv.drop_variance else out
        return denoise

    scale = float(guidance_scale)

    def denoise(x, t):
        out = denoise_batch(torch.cat([x, x]), torch.cat([t, t]))
        if conv.drop_variance == "before":
            out = drop(out, x)
        first, second = out.chunk(2, dim=0)
        cond, uncond = (first, second) if conv.cond_first else (second, first)
        if conv.guided_channels is None:
            n = cond.shape[dim]
        elif conv.guided_channels == "eps":
            n = x.shape[dim]  # the eps half of a learned-variance output
        else:
            n = conv.guided_channels
        mixed = uncond.narrow(dim, 0, n) + scale * (cond.narrow(dim, 0, n) - uncond.narrow(dim, 0, n))
        if n < cond.shape[dim]:
            mixed = torch.cat([mixed, cond.narrow(dim, n, cond.shape[dim] - n)], dim=dim)
        return drop(mixed, x) if conv.drop_variance == "after" else mixed

    return denoise


__all__ = [
    "NUM_TRAIN_TIMESTEPS", "Schedule", "linear_betas", "scaled_linear_betas", "space_timesteps",
    "diffusers_timesteps", "Sampler", "DDPMSampler", "DDIMSampler", "make_sampler", "default_sampler", "HUNYUAN_BETA_END",
    "CFGConvention", "CFG_CONVENTIONS", "guided",
]

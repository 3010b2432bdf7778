"""The training objectives: DiT / Latte's DDPM (improved-diffusion's "hybrid" loss) and Wan's rectified flow, for
any sample layout. `make_objective(family, ...)` picks the family's: wan -> FlowObjective, the others ->
DiffusionObjective. Both give sample_timesteps / q_sample / model_timesteps / losses, so the loop is one.

DDPM (DiffusionObjective):

For x0 and a timestep t drawn uniformly from 0..T-1, x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps and

    loss = mean((eps - eps_pred)^2) + L_vb

where L_vb, present only when the model also outputs the variance values v (2C output channels,
`learn_sigma`), trains the interpolated log-variance frac * log(beta_t) + (1 - frac) * log(post_var_t),
frac = (v + 1) / 2: the KL between the true posterior q(x_{t-1} | x_t, x0) and the model's Gaussian
(the model's mean built from a DETACHED eps_pred, so the variance term does not steer the mean), or at
t = 0 the discretised Gaussian negative log-likelihood of x0 (pixels in [-1, 1], 256 bins). Both are in
bits per dimension, averaged over every dimension but the batch, as the reference computes them.

Rectified flow (FlowObjective), as Wan trains: for x0, noise eps and sigma in [0, 1],

    x_sigma = (1 - sigma) x0 + sigma eps,   target v = eps - x0,   loss = mean((v - v_pred)^2)

with the model called at timestep sigma * 1000 (`skipdit_core.flow`). sigma is a uniform draw u pushed through the
same shift as the sampler's schedule, sigma = shift u / (1 + (shift - 1) u): the N-step Euler sampler visits the
shifted image of a uniform grid, so training sigmas are distributed exactly as the sampler's steps are (each of its
steps gets an equal share of the training signal), with no second parameter (a logit-normal draw, SD3's choice,
would add a location and scale and weigh the middle sigmas whatever the sampler does).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from skipdit_core.diffusion import NUM_TRAIN_TIMESTEPS, Schedule, linear_betas
from skipdit_core.flow import WAN_SHIFT

# Families trained with rectified flow (the rest with the DDPM process).
FLOW_FAMILIES = ("wan",)


def ddpm_schedule(prediction: str = "eps") -> Schedule:
    """The process DiT, Latte and Latte T2V are trained with: linear betas 1e-4 -> 0.02 over 1000 steps;
    the released models predict eps, a model of ours may predict v (`prediction` in its config)."""
    return Schedule.from_betas(linear_betas(), prediction, learned_range=True)


def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] (float64 table, (B,) indices) shaped to broadcast against `like` (B, ...), in float32."""
    out = values.to(t.device)[t].float()
    return out.view(-1, *([1] * (like.dim() - 1)))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) of data in [-1, 1] quantised to 256 bins under N(means, exp(log_scales)^2), elementwise, nats."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    # The edge bins take the whole tail, so the 256 probabilities sum to one.
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class DiffusionObjective:
    """Noising and the hybrid loss over a `Schedule`: MSE to the schedule's target (eps, or
    v = sqrt(a) eps - sqrt(1 - a) x0) plus the VLB term of the learned variance.

    channel_dim: where the model output's channels are (1 for (B, C, H, W) and (B, C, F, H, W),
    2 for Latte's (B, F, C, H, W)); with 2C output channels the second half is the variance values.
    v-prediction weighs an x0 error at timestep t by 1 / (1 - a_t) where eps weighs it by the SNR
    a_t / (1 - a_t): the noisy steps that place the objects count far more, which a small pixel-space
    model needs to learn layouts (the released models are eps).
    """

    def __init__(self, schedule: Optional[Schedule] = None, channel_dim: int = 1):
        self.schedule = schedule or ddpm_schedule()
        self.channel_dim = channel_dim
        ac = self.schedule.alphas_cumprod
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        betas = 1.0 - ac / ac_prev
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        self.num_timesteps = int(ac.shape[0])
        self.sqrt_ac, self.sqrt_one_minus_ac = ac.sqrt(), (1.0 - ac).sqrt()
        self.log_betas = betas.log()
        # log(0) at t = 0 replaced by the t = 1 value, as the reference does ("clipped").
        self.post_log_var = torch.cat([post_var[1:2], post_var[1:]]).log()
        self.post_coef_x0 = betas * ac_prev.sqrt() / (1.0 - ac)
        self.post_coef_xt = (1.0 - ac_prev) * (1.0 - betas).sqrt() / (1.0 - ac)

    def sample_timesteps(self, batch: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B,) int64 timesteps, uniform over 0..T-1."""
        return torch.randint(0, self.num_timesteps, (batch,), device=device, generator=generator)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timesteps the model is called with: t itself, as floats."""
        return t.float()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise; x0, noise: (B, ...), t: (B,) int64."""
        return _at(self.sqrt_ac, t, x0) * x0 + _at(self.sqrt_one_minus_ac, t, x0) * noise

    def losses(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
               noise: torch.Tensor) -> dict:
        """{"loss", "mse", "vb"}: (B,) float32 each ("vb" zeros without a learned variance).

        model_output: (B, ...) with C or 2C channels on `channel_dim`; x0, x_t, noise: (B, ...) with C."""
        c = x0.shape[self.channel_dim]
        model_output = model_output.float()
        co = model_output.shape[self.channel_dim]
        if co == 2 * c:
            pred, var = model_output.split(c, dim=self.channel_dim)
        elif co == c:
            pred, var = model_output, None
        else:
            raise ValueError(f"model output has {co} channels on dim {self.channel_dim}; the data has {c} (expected {c} or {2 * c})")
        if self.schedule.prediction == "eps":
            target, eps = noise.float(), pred
        else:
            a, b = _at(self.sqrt_ac, t, x0), _at(self.sqrt_one_minus_ac, t, x0)
            target, eps = a * noise.float() - b * x0.float(), a * pred + b * x_t.float()
        mse = _mean_flat((target - pred) ** 2)
        vb = torch.zeros_like(mse) if var is None else self._vb(eps.detach(), var, x0.float(), x_t.float(), t)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def _vb(self, eps, v, x0, x_t, t) -> torch.Tensor:
        """L_vb in bits per dimension, (B,)."""
        true_mean = _at(self.post_coef_x0, t, x0) * x0 + _at(self.post_coef_xt, t, x0) * x_t
        true_log_var = _at(self.post_log_var, t, x0)
        x0_pred = (x_t - _at(self.sqrt_one_minus_ac, t, x0) * eps) / _at(self.sqrt_ac, t, x0)
        model_mean = _at(self.post_coef_x0, t, x0) * x0_pred + _at(self.post_coef_xt, t, x0) * x_t
        frac = (v + 1.0) / 2.0
        model_log_var = frac * _at(self.log_betas, t, x0) + (1.0 - frac) * true_log_var
        kl = _mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


class FlowObjective:
    """Rectified flow (Wan): x_sigma = (1 - sigma) x0 + sigma eps, MSE to the velocity v = eps - x0.

    The "timesteps" of this objective are the sigmas themselves, (B,) float32 in [0, 1]; the model sees
    sigma * 1000 (`model_timesteps`). shift: the flow shift of the sigma draw (see the module docstring); train
    with the shift the model will be sampled with (`skipdit_core.flow.WAN_SHIFT`, 5, by default).
    """

    def __init__(self, shift: float = WAN_SHIFT):
        if not shift > 0:
            raise ValueError(f"the flow shift must be positive, got {shift}")
        self.shift = float(shift)

    def sample_timesteps(self, batch: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B,) float32 sigmas: u ~ U[0, 1), shifted as the sampler's schedule is."""
        u = torch.rand(batch, device=device, generator=generator, dtype=torch.float64)
        return (self.shift * u / (1.0 + (self.shift - 1.0) * u)).float()

    def model_timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        """sigma * 1000: the timesteps Wan is trained and sampled at."""
        return sigma.float() * NUM_TRAIN_TIMESTEPS

    @staticmethod
    def _b(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return sigma.float().view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_sigma = (1 - sigma) x0 + sigma noise; x0, noise: (B, ...), sigma: (B,)."""
        s = self._b(sigma, x0)
        return ((1.0 - s) * x0.float() + s * noise.float()).to(x0.dtype)

    @staticmethod
    def target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity v = noise - x0 (d x_sigma / d sigma)."""
        return noise.float() - x0.float()

    def losses(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor,
               noise: torch.Tensor) -> dict:
        """{"loss", "mse", "vb"}: (B,) float32 each; loss = mse, the MSE to v ("vb" zeros: no learned variance)."""
        if model_output.shape != x0.shape:
            raise ValueError(f"the model output {tuple(model_output.shape)} does not match the data {tuple(x0.shape)}: "
                             "a flow model predicts the velocity, one value per data value")
        mse = _mean_flat((self.target(x0, noise) - model_output.float()) ** 2)
        return {"loss": mse, "mse": mse, "vb": torch.zeros_like(mse)}


def make_objective(family: str, model_config=None, flow_shift: Optional[float] = None):
    """The objective a family trains with: wan -> FlowObjective(flow_shift or WAN_SHIFT); the DDPM families ->
    DiffusionObjective over the linear schedule with the config's `prediction` (Latte's channels on dim 2)."""
    if family in FLOW_FAMILIES:
        return FlowObjective(WAN_SHIFT if flow_shift is None else flow_shift)
    if flow_shift is not None:
        raise ValueError(f"a flow shift applies to the flow-matching families ({', '.join(FLOW_FAMILIES)}), not {family}")
    return DiffusionObjective(ddpm_schedule(getattr(model_config, "prediction", "eps")),
                              channel_dim=2 if family == "latte" else 1)


__all__ = ["DiffusionObjective", "FlowObjective", "make_objective", "FLOW_FAMILIES", "ddpm_schedule", "normal_kl",
           "discretized_gaussian_log_likelihood", "NUM_TRAIN_TIMESTEPS"]

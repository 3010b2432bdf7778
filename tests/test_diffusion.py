"""Samplers: timestep lists, the math against diffusers' schedulers and an independent straight-line
improved-diffusion implementation, classifier-free guidance conventions, determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from helpers import assert_close

from skipdit_core.diffusion import (
    CFG_CONVENTIONS, DDIMSampler, DDPMSampler, Schedule, diffusers_timesteps, guided, linear_betas, make_sampler,
    scaled_linear_betas, space_timesteps,
)


def fake_pred(x, t):
    """A cheap stand-in for a model: a fixed function of x and t (eps or v)."""
    s = (t / 1000.0).view(-1, *([1] * (x.ndim - 1)))
    return 0.3 * x * (1 - s) + 0.1 * torch.sin(3 * x + 5 * s)


def fake_learned(channel_dim=1):
    """eps plus learned-range variance values in [-1, 1]: 2C channels on `channel_dim`."""
    def model(x, t):
        s = (t / 1000.0).view(-1, *([1] * (x.ndim - 1)))
        return torch.cat([fake_pred(x, t), torch.tanh(x + 2 * s - 1)], dim=channel_dim)
    return model


def x_T(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- timestep lists

def test_improved_diffusion_respacing():
    ddpm250 = space_timesteps(1000, 250)
    assert len(ddpm250) == 250 and ddpm250[:3] == [0, 4, 8] and ddpm250[-3:] == [991, 995, 999]
    assert ddpm250 == [round(i * 999 / 249) for i in range(250)] == space_timesteps(1000, "250")
    even50 = space_timesteps(1000, 50)
    assert len(even50) == 50 and even50[:3] == [0, 20, 41] and even50[-3:] == [958, 979, 999]
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert space_timesteps(300, "10,15,20")[:3] == [0, 11, 22] and len(space_timesteps(300, [10, 15, 20])) == 45
    assert space_timesteps(1000, 1000) == list(range(1000))
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim999")


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps,offset", [(50, 0), (100, 1), (250, 0), (37, 1)])
def test_diffusers_timesteps_match_diffusers(spacing, steps, offset):
    for cls in (DDIMScheduler, DDPMScheduler):
        sched = cls(timestep_spacing=spacing, steps_offset=offset)
        sched.set_timesteps(steps)
        assert diffusers_timesteps(steps, spacing, offset) == sched.timesteps.tolist()


def test_family_timesteps():
    assert make_sampler("dit", "ddpm").timesteps == space_timesteps(1000, 250)[::-1]
    assert make_sampler("latte", "ddim").timesteps == space_timesteps(1000, 50)[::-1]  # authors: create_diffusion("50")
    assert make_sampler("latte", "ddim", spacing="ddim").timesteps == list(range(980, -1, -20))
    t2v = make_sampler("latte_t2v", "ddim").timesteps
    assert t2v == list(range(980, -1, -20))
    hy100 = make_sampler("hunyuan", "ddpm").timesteps
    assert len(hy100) == 100 and hy100[:3] == [991, 981, 971] and hy100[-3:] == [21, 11, 1]
    assert make_sampler("hunyuan", "ddim").timesteps == list(range(981, 0, -20))
    assert len(make_sampler("dit", "ddpm", 1000)) == 1000


# ---------------------------------------------------------------------------- improved-diffusion

def reference_improved(model, noise, kept, sampler, eta=0.0, generator=None):
    """Straight-line improved-diffusion (SpacedDiffusion + p_sample / ddim_sample, learned range, no
    clipping), float64 numpy tables, float32 coefficients applied per step as `_extract_into_tensor`."""
    base = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    betas, last = [], 1.0
    for t in kept:
        betas.append(1.0 - base[t] / last)
        last = base[t]
    betas = np.array(betas)
    ac = np.cumprod(1.0 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
    coef2 = (1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac)
    f = lambda arr, i: torch.tensor(float(arr[i]), dtype=torch.float32)
    x = noise.clone()
    for i in reversed(range(len(kept))):
        out = model(x, torch.full((x.shape[0],), float(kept[i])))
        eps, v = out.split(x.shape[1], dim=1)
        x0 = f(np.sqrt(1.0 / ac), i) * x - f(np.sqrt(1.0 / ac - 1), i) * eps
        if sampler == "ddpm":
            frac = (v + 1) / 2
            logvar = frac * f(np.log(betas), i) + (1 - frac) * f(post_logvar, i)
            mean = f(coef1, i) * x0 + f(coef2, i) * x
            x = mean + float(i != 0) * torch.exp(0.5 * logvar) * torch.randn(x.shape, generator=generator)
        else:
            eps = (f(np.sqrt(1.0 / ac), i) * x - x0) / f(np.sqrt(1.0 / ac - 1), i)
            a, a_prev = f(ac, i), f(ac_prev, i)
            sigma = eta * torch.sqrt((1 - a_prev) / (1 - a)) * torch.sqrt(1 - a / a_prev)
            noise_i = torch.randn(x.shape, generator=generator)  # drawn at every step, as ddim_sample does
            x = x0 * torch.sqrt(a_prev) + torch.sqrt(1 - a_prev - sigma ** 2) * eps + float(i != 0) * sigma * noise_i
    return x


def test_dit_ddpm250_matches_straight_line_improved_diffusion():
    noise, model = x_T((2, 4, 4, 4)), fake_learned()
    sampler = make_sampler("dit", "ddpm", 250)
    ours = sampler.sample(model, noise, generator=torch.Generator().manual_seed(7))
    ref = reference_improved(model, noise, space_timesteps(1000, 250), "ddpm", generator=torch.Generator().manual_seed(7))
    assert_close(ours, ref, 1e-5)


@pytest.mark.parametrize("spacing,eta", [(None, 0.0), ("ddim", 0.0), ("ddim", 0.5)])
def test_dit_ddim50_matches_straight_line_improved_diffusion(spacing, eta):
    noise, model = x_T((2, 4, 4, 4), 1), fake_learned()
    sampler = make_sampler("dit", "ddim", 50, spacing=spacing, eta=eta)
    kept = sorted(sampler.timesteps)
    ours = sampler.sample(model, noise, generator=torch.Generator().manual_seed(3))
    ref = reference_improved(model, noise, kept, "ddim", eta=eta, generator=torch.Generator().manual_seed(3))
    assert_close(ours, ref, 1e-5)


def test_latte_layout_is_the_dit_math_on_dim_2():
    noise = x_T((1, 1, 4, 2, 2), 2)  # (B, F, C, H, W); F = 1 keeps the noise draws' order under the permute
    flat = lambda v: v.permute(0, 2, 1, 3, 4)  # -> (B, C, F, H, W): channels on dim 1
    video = make_sampler("latte", "ddpm", 25).sample(fake_learned(2), noise, generator=3)
    image = make_sampler("dit", "ddpm", 25).sample(
        lambda x, t: flat(fake_learned(2)(flat(x), t)), flat(noise), generator=3)
    torch.testing.assert_close(flat(video), image, rtol=0, atol=0)


def test_dit_ddpm250_matches_diffusers_ddpm_learned_range():
    """diffusers' DDPMScheduler with the respaced timesteps as custom timesteps and learned_range is
    the same process (its alphas_cumprod are float32, ours float64)."""
    noise, model = x_T((2, 4, 4, 4), 4), fake_learned()
    sampler = make_sampler("dit", "ddpm", 250)
    ours = sampler.sample(model, noise, generator=torch.Generator().manual_seed(5))
    sched = DDPMScheduler(variance_type="learned_range", clip_sample=False)
    sched.set_timesteps(timesteps=sampler.timesteps)
    x, g = noise.clone(), torch.Generator().manual_seed(5)
    for t in sched.timesteps:
        x = sched.step(model(x, t.float().expand(x.shape[0])), t, x, generator=g).prev_sample
    assert_close(ours, x, 2e-5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim50_matches_diffusers_ddim(eta):
    """Latte T2V: diffusers DDIMScheduler, Latte-1 config (linear, "leading", offset 0, alpha to one)."""
    noise = x_T((1, 4, 3, 4, 4), 6)  # (B, C, F, H, W)
    ours = make_sampler("latte_t2v", "ddim", 50, eta=eta).sample(fake_pred, noise, generator=torch.Generator().manual_seed(9))
    sched = DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False)
    sched.set_timesteps(50)
    x, g = noise.clone(), torch.Generator().manual_seed(9)
    for t in sched.timesteps:
        x = sched.step(fake_pred(x, t.float().expand(1)), t, x, eta=eta, generator=g).prev_sample
    assert_close(ours, x, 1e-5)
    # improved-diffusion's "ddim50" is the same walk (float64 tables)
    dit = make_sampler("dit", "ddim", 50, spacing="ddim", eta=eta)
    assert dit.timesteps == sched.timesteps.tolist()
    if eta == 0.0:
        assert_close(dit.sample(fake_pred, noise), x, 1e-5)


# ---------------------------------------------------------------------------- Hunyuan-DiT (v, diffusers)

def diffusers_loop(sched, noise, steps, eta=None, seed=0):
    sched.set_timesteps(steps)
    x, g = noise.clone(), torch.Generator().manual_seed(seed)
    for t in sched.timesteps:
        kw = {} if eta is None else {"eta": eta}
        x = sched.step(fake_pred(x, t.float().expand(x.shape[0])), t, x, generator=g, **kw).prev_sample
    return x


HY = dict(beta_schedule="scaled_linear", beta_start=0.00085, prediction_type="v_prediction",
          steps_offset=1, clip_sample=False)


@pytest.mark.parametrize("version,beta_end", [("1.2", 0.02), ("1.1", 0.03)])
def test_hunyuan_ddpm100_matches_diffusers(version, beta_end):
    noise = x_T((2, 4, 8, 8), 10)
    ours = make_sampler("hunyuan", "ddpm", 100, version=version).sample(fake_pred, noise, generator=torch.Generator().manual_seed(11))
    ref = diffusers_loop(DDPMScheduler(beta_end=beta_end, **HY), noise, 100, seed=11)
    assert_close(ours, ref, 1e-5)


@pytest.mark.parametrize("eta,alpha_to_one", [(0.0, True), (1.0, True), (0.0, False)])
def test_hunyuan_ddim50_matches_diffusers(eta, alpha_to_one):
    noise = x_T((2, 4, 8, 8), 12)
    sampler = make_sampler("hunyuan", "ddim", 50, eta=eta, beta_end=0.02, set_alpha_to_one=alpha_to_one)
    ours = sampler.sample(fake_pred, noise, generator=torch.Generator().manual_seed(13))
    ref = diffusers_loop(DDIMScheduler(beta_end=0.02, set_alpha_to_one=alpha_to_one, **HY), noise, 50, eta=eta, seed=13)
    assert_close(ours, ref, 1e-5)


def test_hunyuan_takes_the_first_half_of_an_8_channel_output():
    noise = x_T((1, 4, 4, 4), 14)
    raw = lambda x, t: torch.cat([fake_pred(x, t), torch.full_like(x, 123.0)], dim=1)
    s = make_sampler("hunyuan", "ddim", 10)
    torch.testing.assert_close(s.sample(raw, noise), s.sample(fake_pred, noise), rtol=0, atol=0)


# ---------------------------------------------------------------------------- guidance

class FakeBatched:
    """Row r of the doubled batch returns 10 * (r + 1) + channel index (2C channels): every output
    value tells which half and which channel it came from."""

    def __init__(self, channel_dim):
        self.channel_dim, self.calls = channel_dim, []

    def __call__(self, x, t):
        self.calls.append((x.shape[0], t.clone()))
        c = x.shape[self.channel_dim]
        shape = list(x.shape)
        shape[self.channel_dim] = 2 * c
        idx = [1] * x.ndim
        idx[self.channel_dim] = 2 * c
        rows = torch.arange(x.shape[0], dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return (10.0 * (rows + 1) + torch.arange(2 * c, dtype=x.dtype).view(idx)).expand(shape).clone()


@pytest.mark.parametrize("family,shape,dim", [
    ("dit", (1, 4, 2, 2), 1), ("latte", (1, 3, 4, 2, 2), 2), ("latte_t2v", (1, 4, 3, 2, 2), 1), ("hunyuan", (1, 4, 2, 2), 1)])
def test_cfg_conventions(family, shape, dim):
    s = 4.0
    x, t = torch.zeros(shape), torch.full((1,), 500.0)
    model = FakeBatched(dim)
    out = guided(model, s, family)(x, t)
    assert len(model.calls) == 1 and model.calls[0][0] == 2 and model.calls[0][1].tolist() == [500.0, 500.0]
    ch = lambda v: v.movedim(dim, 1)[0, :, 0].flatten(1)[:, 0]  # per-channel value of sample 0
    first, second = 10.0 + torch.arange(8.0), 20.0 + torch.arange(8.0)
    cond, uncond = (first, second) if family in ("dit", "latte") else (second, first)
    mix = uncond + s * (cond - uncond)
    expected = {
        "dit": torch.cat([mix[:3], cond[3:]]),  # first 3 channels guided, the rest conditional
        "latte": torch.cat([mix[:4], cond[4:]]),  # the 4 eps channels guided, variance conditional
        "latte_t2v": mix[:4],  # all 8 guided, variance dropped
        "hunyuan": mix[:4],  # variance dropped, then guided
    }[family]
    assert out.shape[dim] == expected.numel() and out.shape[0] == 1
    torch.testing.assert_close(ch(out), expected)
    assert CFG_CONVENTIONS[family].channel_dim == dim


def test_pixel_space_latte_guides_its_three_eps_channels_only():
    """A 3-channel Latte with learned variance outputs 6 channels: eps (3) guided, variance (3) conditional."""
    out = guided(FakeBatched(2), 4.0, "latte")(torch.zeros(1, 2, 3, 2, 2), torch.full((1,), 500.0))
    cond, uncond = 10.0 + torch.arange(6.0), 20.0 + torch.arange(6.0)
    torch.testing.assert_close(out[0, 0, :, 0, 0], torch.cat([(uncond + 4.0 * (cond - uncond))[:3], cond[3:]]))


@pytest.mark.parametrize("scale", [None, 1.0])
@pytest.mark.parametrize("family,shape,dim", [("dit", (2, 4, 2, 2), 1), ("hunyuan", (2, 4, 2, 2), 1)])
def test_no_guidance_makes_one_undoubled_call(scale, family, shape, dim):
    model = FakeBatched(dim)
    out = guided(model, scale, family)(torch.zeros(shape), torch.full((2,), 10.0))
    assert [c[0] for c in model.calls] == [2]
    assert out.shape[dim] == (8 if family == "dit" else 4)


def test_guided_sampling_calls_the_model_once_per_step():
    calls = []

    def batched(x, t):
        calls.append(t[0].item())
        return fake_learned()(x, t)

    sampler = make_sampler("dit", "ddpm", 20)
    sampler.sample(guided(batched, 4.0, "dit"), (1, 4, 4, 4), generator=0)
    assert calls == [float(t) for t in sampler.timesteps]


# ---------------------------------------------------------------------------- determinism, hooks, errors

@pytest.mark.parametrize("family,name,shape", [("dit", "ddpm", (1, 4, 4, 4)), ("hunyuan", "ddpm", (1, 4, 4, 4)),
                                               ("latte_t2v", "ddim", (1, 4, 2, 4, 4))])
def test_seed_determinism(family, name, shape):
    sampler = make_sampler(family, name, 20, eta=1.0 if name == "ddim" else 0.0)
    model = fake_learned() if family == "dit" else fake_pred
    a = sampler.sample(model, shape, generator=0)
    b = sampler.sample(model, shape, generator=torch.Generator().manual_seed(0))
    c = sampler.sample(model, shape, generator=1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    noise = x_T(shape, 3)  # given x_T: only the per-step noise comes from the generator
    torch.testing.assert_close(sampler.sample(model, noise, generator=5), sampler.sample(model, noise, generator=5), rtol=0, atol=0)
    assert not torch.allclose(sampler.sample(model, noise, generator=5), sampler.sample(model, noise, generator=6))


def test_callback_and_model_timesteps():
    seen, progress = [], []
    sampler = make_sampler("hunyuan", "ddim", 10)

    def model(x, t):
        assert t.dtype == torch.float32 and t.shape == (x.shape[0],)
        seen.append(t[0].item())
        return fake_pred(x, t)

    sampler.sample(model, (2, 4, 4, 4), generator=0, callback=lambda i, n, t: progress.append((i, n, t)))
    assert seen == [float(t) for t in sampler.timesteps]
    assert progress == [(i, 10, t) for i, t in enumerate(sampler.timesteps)]


def test_errors_and_custom_samplers():
    with pytest.raises(ValueError, match="2C channels"):
        make_sampler("dit", "ddpm", 10).sample(fake_pred, (1, 4, 2, 2), generator=0)
    with pytest.raises(ValueError, match="unknown family"):
        make_sampler("sd15", "ddim")
    with pytest.raises(ValueError, match="version"):
        make_sampler("hunyuan", "ddim", version="2.0")
    with pytest.raises(ValueError, match="descending"):
        DDIMSampler(Schedule.from_betas(linear_betas()), [0, 10])
    # a full-length DDPM over the raw schedule: 1000 steps, prev = t - 1
    sched = Schedule.from_betas(scaled_linear_betas(0.012), "eps")
    full = DDPMSampler(sched, range(999, -1, -1))
    assert full.timesteps[:2] == [999, 998] and len(full) == 1000

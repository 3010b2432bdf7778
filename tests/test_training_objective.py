"""The training objective: noising, the eps MSE and the variational term of the learned variance."""
import math

import pytest
import torch

from training.objective import DiffusionObjective, ddpm_schedule, discretized_gaussian_log_likelihood, normal_kl


def _case(shape=(4, 3, 8, 8), channel_dim=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=g) * 2 - 1
    noise = torch.randn(shape, generator=g)
    return x0, noise


def test_q_sample_matches_the_closed_form():
    obj = DiffusionObjective()
    x0, noise = _case()
    t = torch.tensor([0, 10, 500, 999])
    a = obj.schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(obj.q_sample(x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise)
    assert obj.schedule.alphas_cumprod[999] < 1e-4  # x_999 is almost pure noise


def test_exact_eps_and_posterior_variance_give_zero_loss_after_t0():
    obj = DiffusionObjective()
    x0, noise = _case()
    t = torch.tensor([1, 50, 400, 999])
    x_t = obj.q_sample(x0, t, noise)
    v = -torch.ones_like(noise)  # frac = 0: the posterior's own log-variance
    terms = obj.losses(torch.cat([noise, v], dim=1), x0, x_t, t, noise)
    assert terms["mse"].abs().max() < 1e-10
    assert terms["vb"].abs().max() < 1e-3
    # A wrong variance (beta instead of the posterior's) costs bits; the two meet as t grows.
    worse = obj.losses(torch.cat([noise, torch.ones_like(v)], dim=1), x0, x_t, t, noise)["vb"]
    assert worse[0] > 0.1 and (worse[:3] > terms["vb"][:3]).all() and worse[0] > worse[1] > worse[2]


def test_variance_term_does_not_train_the_mean_channels():
    obj = DiffusionObjective(channel_dim=2)  # Latte layout (B, F, C, H, W)
    x0, noise = _case((2, 3, 4, 8, 8))
    t = torch.tensor([5, 600])
    x_t = obj.q_sample(x0, t, noise)
    out = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
    obj.losses(out, x0, x_t, t, noise)["vb"].sum().backward()
    assert out.grad[:, :, :4].abs().max() == 0  # eps channels: no gradient from L_vb
    assert out.grad[:, :, 4:].abs().max() > 0


def test_without_learned_variance_the_loss_is_the_mse():
    obj = DiffusionObjective()
    x0, noise = _case()
    t = torch.tensor([0, 1, 2, 3])
    pred = noise + 0.1
    terms = obj.losses(pred, x0, obj.q_sample(x0, t, noise), t, noise)
    torch.testing.assert_close(terms["loss"], torch.full((4,), 0.01))
    assert (terms["vb"] == 0).all()
    with pytest.raises(ValueError, match="channels"):
        obj.losses(torch.zeros(4, 5, 8, 8), x0, x0, t, noise)


def test_t0_term_is_the_decoder_likelihood_of_256_bins():
    # The 256 bin probabilities of the discretised Gaussian sum to one.
    bins = torch.linspace(-1, 1, 256)
    for mean, log_scale in [(0.0, math.log(0.05)), (0.7, math.log(0.3)), (-1.0, math.log(0.01))]:
        logp = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale))
        assert abs(logp.exp().sum().item() - 1.0) < 1e-3
    assert normal_kl(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3)).abs().max() == 0


def test_v_prediction_target_and_its_variance_term():
    """prediction v: the target is sqrt(a) eps - sqrt(1 - a) x0; the exact v costs nothing, and the
    variance term sees the same eps (hence the same bits) as an eps model with the exact eps."""
    eps_obj, v_obj = DiffusionObjective(), DiffusionObjective(ddpm_schedule("v"))
    x0, noise = _case()
    t = torch.tensor([1, 50, 400, 999])
    x_t = v_obj.q_sample(x0, t, noise)
    a = v_obj.schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    var = torch.rand_like(noise) * 2 - 1
    terms = v_obj.losses(torch.cat([v, var], dim=1), x0, x_t, t, noise)
    assert terms["mse"].abs().max() < 1e-10
    torch.testing.assert_close(terms["vb"], eps_obj.losses(torch.cat([noise, var], dim=1), x0, x_t, t, noise)["vb"],
                               rtol=1e-4, atol=1e-5)
    # An eps-shaped answer is wrong for a v model: the loss is the distance to v.
    wrong = v_obj.losses(noise, x0, x_t, t, noise)["mse"]
    torch.testing.assert_close(wrong, ((noise - v) ** 2).mean((1, 2, 3)))

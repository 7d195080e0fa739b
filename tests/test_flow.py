"""Flow matching: the sigma distributions checked with numbers, the weighting curve, and Z-Image's sign conventions."""

import math
from typing import get_args

import pytest
import torch

from zimage_lora.config import TimestepBias, TimestepType
from zimage_lora.training import flow
from zimage_lora.training.flow import (
    SIGMA_MIN,
    TIMESTEP_BIASES,
    TIMESTEP_TYPES,
    apply_bias,
    flow_loss,
    flow_target,
    model_time,
    noisy_latents,
    sample_sigmas,
    shift_sigma,
    timestep_weights,
    velocity_from_output,
)

N = 200_000
# Standard errors at N draws are ~1e-3 for means and quantiles; these tolerances sit at 3-5 of them.
TOL = 4e-3


def draws(timestep_type: str, bias: str = "balanced", seed: int = 0, shift: float = 3.0, n: int = N) -> torch.Tensor:
    return sample_sigmas(n, timestep_type, bias, torch.Generator().manual_seed(seed), shift=shift)


def fraction_below(s: torch.Tensor, x: float) -> float:
    return (s < x).double().mean().item()


def logit(s: torch.Tensor) -> torch.Tensor:
    s = s.double()
    return torch.log(s / (1 - s))


# --- distributions -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("timestep_type", ["linear", "weighted"])
def test_linear_and_weighted_draw_uniform_sigmas(timestep_type):
    s = draws(timestep_type)
    assert s.shape == (N,)
    assert s.double().mean().item() == pytest.approx(0.5, abs=TOL)
    assert s.double().var().item() == pytest.approx(1 / 12, abs=TOL)
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert torch.quantile(s.double(), q).item() == pytest.approx(q, abs=TOL)


def test_sigmoid_is_sigmoid_of_a_standard_normal():
    s = draws("sigmoid")
    assert s.median().item() == pytest.approx(0.5, abs=TOL)
    # P(z < -1) = P(z > 1) = 0.1587: the logit quantiles of N(0, 1)
    assert fraction_below(s, 1 / (1 + math.e)) == pytest.approx(0.1587, abs=TOL)
    assert fraction_below(s, 1 / (1 + math.exp(-1))) == pytest.approx(1 - 0.1587, abs=TOL)
    z = logit(s)
    assert z.mean().item() == pytest.approx(0.0, abs=2 * TOL)
    assert z.std().item() == pytest.approx(1.0, abs=2 * TOL)


def test_shift_is_the_schedulers_shift_of_a_uniform_draw():
    s = draws("shift", shift=3.0)
    # u = 0.5 -> 3u / (1 + 2u) = 0.75; u = 0.25 -> 0.5; u = 0.75 -> 0.9
    assert s.median().item() == pytest.approx(0.75, abs=TOL)
    assert fraction_below(s, 0.5) == pytest.approx(0.25, abs=TOL)
    assert fraction_below(s, 0.9) == pytest.approx(0.75, abs=TOL)


def test_shift_follows_the_shift_argument():
    # shift 6 (Base): median 6 * 0.5 / (1 + 5 * 0.5) = 6/7
    assert draws("shift", shift=6.0).median().item() == pytest.approx(6 / 7, abs=TOL)
    assert draws("shift", shift=1.0).median().item() == pytest.approx(0.5, abs=TOL)


def test_lognorm_is_logit_normal_centred_on_log_shift():
    s = draws("lognorm", shift=3.0)
    assert s.median().item() == pytest.approx(0.75, abs=TOL)  # sigmoid(log 3)
    z = logit(s)
    assert z.mean().item() == pytest.approx(math.log(3.0), abs=2 * TOL)
    assert z.std().item() == pytest.approx(1.0, abs=2 * TOL)


def test_lognorm_equals_a_shifted_sigmoid_draw():
    # the docstring's claim: shifting a sigmoid draw by `shift` gives the lognorm distribution
    s = draws("lognorm", shift=3.0).double()
    t = shift_sigma(draws("sigmoid", seed=1).double(), 3.0)
    for q in (0.1, 0.3, 0.5, 0.7, 0.9):
        assert torch.quantile(s, q).item() == pytest.approx(torch.quantile(t, q).item(), abs=TOL)


def test_bias_moves_uniform_draws_to_the_documented_means():
    assert draws("linear", "high_noise").double().mean().item() == pytest.approx(2 / 3, abs=TOL)
    assert draws("linear", "low_noise").double().mean().item() == pytest.approx(1 / 3, abs=TOL)
    # low_noise is s^2: P(s^2 < 0.25) = P(s < 0.5)
    assert fraction_below(draws("linear", "low_noise"), 0.25) == pytest.approx(0.5, abs=TOL)
    assert fraction_below(draws("linear", "high_noise"), 0.75) == pytest.approx(0.5, abs=TOL)


@pytest.mark.parametrize("timestep_type", TIMESTEP_TYPES)
def test_bias_warps_each_draw_in_its_direction(timestep_type):
    balanced = draws(timestep_type, "balanced", n=20_000)
    high = draws(timestep_type, "high_noise", n=20_000)
    low = draws(timestep_type, "low_noise", n=20_000)
    assert (high >= balanced).all() and (low <= balanced).all()
    assert high.mean() > balanced.mean() + 0.05 and low.mean() < balanced.mean() - 0.05


@pytest.mark.parametrize("bias", TIMESTEP_BIASES)
@pytest.mark.parametrize("timestep_type", TIMESTEP_TYPES)
def test_every_type_and_bias_stays_in_range(timestep_type, bias):
    s = draws(timestep_type, bias, n=50_000)
    assert s.dtype == torch.float32 and s.shape == (50_000,)
    assert s.min().item() >= SIGMA_MIN and s.max().item() <= 1.0
    assert torch.isfinite(s).all()


def test_tiny_sigmas_are_clamped_to_the_minimum():
    # low_noise squares uniform draws: about 3% of them fall under 1e-3 before the clamp
    s = draws("linear", "low_noise")
    assert s.min().item() == pytest.approx(SIGMA_MIN)
    assert fraction_below(s, SIGMA_MIN * 1.0001) == pytest.approx(math.sqrt(SIGMA_MIN), abs=TOL)


@pytest.mark.parametrize("timestep_type", TIMESTEP_TYPES)
def test_same_seed_same_draws(timestep_type):
    a, b = draws(timestep_type, "high_noise", seed=7, n=1000), draws(timestep_type, "high_noise", seed=7, n=1000)
    assert torch.equal(a, b)
    assert not torch.equal(a, draws(timestep_type, "high_noise", seed=8, n=1000))


def test_unknown_names_raise():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="uniform"):
        sample_sigmas(4, "uniform", "balanced", g)
    with pytest.raises(ValueError, match="middle"):
        sample_sigmas(4, "linear", "middle", g)
    with pytest.raises(ValueError, match="middle"):
        apply_bias(torch.rand(4), "middle")


def test_shift_sigma_values():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(shift_sigma(s, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    assert torch.allclose(shift_sigma(s, 1.0), s)
    # the formula is diffusers' scheduler's, restated: the same shifted schedule for Turbo's 3 and Base's 6
    from diffusers import FlowMatchEulerDiscreteScheduler

    levels = [0.95, 0.7, 0.4, 0.1]
    for shift in (3.0, 6.0):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        scheduler.set_timesteps(sigmas=levels)
        assert torch.allclose(scheduler.sigmas[:-1], shift_sigma(torch.tensor(levels), shift))


# --- the weighted curve ------------------------------------------------------------------------------------------


def test_weighted_curve_has_mean_one_under_uniform_draws():
    grid = torch.linspace(0, 1, 100_001, dtype=torch.float64)
    w = timestep_weights(grid, "weighted")
    assert w.mean().item() == pytest.approx(1.0, abs=1e-3)
    # and on the sampler's own draws
    assert timestep_weights(draws("weighted"), "weighted").double().mean().item() == pytest.approx(1.0, abs=5e-3)


def test_weighted_curve_matches_its_documented_shape():
    grid = torch.linspace(0, 1, 10_001, dtype=torch.float64)
    w = timestep_weights(grid, "weighted")
    assert grid[w.argmax()].item() == pytest.approx(0.8, abs=0.02)
    assert w.max().item() == pytest.approx(1.66, abs=0.01)
    assert w[0].item() == pytest.approx(0.52, abs=0.01)
    assert w[-1].item() == pytest.approx(1.21, abs=0.01)
    assert (w > 0).all()
    # rises up to the peak, falls after it
    peak = int(w.argmax())
    assert (w[1 : peak + 1] >= w[:peak]).all() and (w[peak + 1 :] <= w[peak:-1]).all()


@pytest.mark.parametrize("timestep_type", [t for t in TIMESTEP_TYPES if t != "weighted"])
def test_other_types_weigh_every_sample_one(timestep_type):
    s = draws(timestep_type, n=64)
    assert torch.equal(timestep_weights(s, timestep_type), torch.ones(64))


# --- conventions -------------------------------------------------------------------------------------------------


def latents(seed: int, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 16, 1, 4, 6, generator=torch.Generator().manual_seed(seed))


def test_noisy_latents_mix_each_item_with_its_own_sigma():
    x0, noise = latents(0), latents(1)
    sigma = torch.tensor([0.0, 0.3, 1.0])
    xt = noisy_latents(x0, noise, sigma)
    assert xt.shape == x0.shape
    for i, s in enumerate(sigma.tolist()):
        assert torch.allclose(xt[i], (1 - s) * x0[i] + s * noise[i], atol=1e-6)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], noise[2])


def test_noisy_latents_keep_the_latent_dtype():
    x0, noise = latents(0).bfloat16(), latents(1).bfloat16()
    assert noisy_latents(x0, noise, torch.tensor([0.1, 0.5, 0.9])).dtype == torch.bfloat16


def test_model_time_is_one_minus_sigma():
    sigma = torch.tensor([0.0, 0.25, 1.0])
    assert torch.equal(model_time(sigma), torch.tensor([1.0, 0.75, 0.0]))


def test_target_is_the_velocity_and_the_model_predicts_its_negative():
    x0, noise = latents(0), latents(1)
    assert torch.equal(flow_target(x0, noise), noise - x0)
    assert torch.equal(velocity_from_output(x0 - noise), noise - x0)
    # the velocity is the derivative of x_t along sigma
    a, b = noisy_latents(x0, noise, torch.full((3,), 0.4)), noisy_latents(x0, noise, torch.full((3,), 0.6))
    assert torch.allclose((b - a) / 0.2, flow_target(x0, noise), atol=1e-4)


def test_flow_loss_is_zero_for_the_negative_velocity():
    x0, noise = latents(0), latents(1)
    ones = torch.ones(3)
    assert flow_loss(x0 - noise, x0, noise, ones).item() == 0.0
    wrong = flow_loss(noise - x0, x0, noise, ones)
    # -output = x0 - noise, off by 2 (noise - x0)
    assert wrong.item() == pytest.approx((4 * (noise - x0) ** 2).mean().item(), rel=1e-5)
    assert wrong.item() > 1.0


def test_flow_loss_accepts_the_transformers_list_output():
    x0, noise = latents(0), latents(1)
    output = latents(2)
    weights = torch.tensor([0.5, 1.0, 2.0])
    as_list = [o.to(torch.bfloat16) for o in output]
    expected = flow_loss(output.to(torch.bfloat16), x0, noise, weights)
    assert torch.equal(flow_loss(as_list, x0, noise, weights), expected)
    assert flow_loss(as_list, x0, noise, weights).dtype == torch.float32


def test_flow_loss_weighs_items():
    x0, noise, output = latents(0), latents(1), latents(2)
    per_item = ((-output - (noise - x0)) ** 2).flatten(1).mean(1)
    weights = torch.tensor([0.5, 1.0, 2.0])
    assert flow_loss(output, x0, noise, weights).item() == pytest.approx((per_item * weights).mean().item(), rel=1e-6)

    # a weight of zero removes an item: changing its output changes nothing
    drop_last = torch.tensor([1.0, 1.0, 0.0])
    other = output.clone()
    other[2] += 100.0
    assert flow_loss(output, x0, noise, drop_last).item() == flow_loss(other, x0, noise, drop_last).item()
    assert flow_loss(output, x0, noise, drop_last).item() == pytest.approx(per_item[:2].sum().item() / 3, rel=1e-6)


def test_flow_loss_gradient_points_to_the_negative_velocity():
    x0, noise = latents(0), latents(1)
    output = torch.zeros_like(x0, requires_grad=True)
    flow_loss(output, x0, noise, torch.ones(3)).backward()
    # descending from output = 0 moves the output along x0 - noise
    cos = torch.nn.functional.cosine_similarity(-output.grad.flatten(), (x0 - noise).flatten(), dim=0)
    assert cos.item() == pytest.approx(1.0, abs=1e-6)


def test_config_offers_exactly_the_types_and_biases_the_sampler_knows():
    assert set(get_args(TimestepType)) == set(flow.TIMESTEP_TYPES)
    assert set(get_args(TimestepBias)) == set(flow.TIMESTEP_BIASES)


def _cdf(timestep_type: str, bias: str, s: torch.Tensor, shift: float = 3.0) -> torch.Tensor:
    """Analytic CDF of the documented draw: the type's distribution, then the bias's monotone warp."""
    if bias == "high_noise":
        s = 1 - torch.sqrt(1 - s)  # s' = 1 - (1 - s)^2
    elif bias == "low_noise":
        s = torch.sqrt(s)  # s' = s^2
    normal = torch.distributions.Normal(0.0, 1.0)
    logit = torch.log(s.clamp(1e-12, 1 - 1e-12) / (1 - s).clamp(1e-12))
    if timestep_type in ("linear", "weighted"):
        return s
    if timestep_type == "sigmoid":
        return normal.cdf(logit)
    if timestep_type == "shift":
        return s / (shift - (shift - 1) * s)
    return normal.cdf(logit - math.log(shift))  # lognorm


@pytest.mark.parametrize("bias", TIMESTEP_BIASES)
@pytest.mark.parametrize("timestep_type", TIMESTEP_TYPES)
def test_histogram_matches_the_documented_distribution(timestep_type, bias):
    draws = sample_sigmas(200_000, timestep_type, bias, torch.Generator().manual_seed(11), 3.0)
    edges = torch.linspace(0, 1, 11, dtype=torch.float64)
    counts = torch.histc(draws.double(), bins=10, min=0, max=1) / draws.numel()
    expected = _cdf(timestep_type, bias, edges[1:]) - _cdf(timestep_type, bias, edges[:-1])
    assert (counts - expected).abs().max() < 0.005, (counts, expected)

"""Flow matching with Z-Image's conventions, as small pure functions.

- noise level sigma ``s`` in [0, 1]; ``x_t = (1 - s) * x0 + s * noise``;
- the transformer's time input is ``t = 1 - s`` (0 = pure noise, 1 = clean);
- the transformer predicts the NEGATIVE velocity ``x0 - noise``; the training target is ``noise - x0``
  compared with ``-output``.

Timestep sampling (``train.timestep_type``) decides which noise levels a step trains; the bias
(``train.timestep_bias``) then pushes draws toward high or low noise. Only ``weighted`` changes the loss weights.
"""

from __future__ import annotations

import math

import torch

SIGMA_MIN = 1e-3

TIMESTEP_TYPES = ("weighted", "sigmoid", "linear", "shift", "lognorm")
TIMESTEP_BIASES = ("balanced", "high_noise", "low_noise")


def model_time(sigma: torch.Tensor) -> torch.Tensor:
    """Time input of ZImageTransformer2DModel for noise level ``sigma``."""
    return 1.0 - sigma


def velocity_from_output(output: torch.Tensor) -> torch.Tensor:
    """The flow velocity ``noise - x0`` from the transformer's output (which is its negative)."""
    return -output


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The scheduler's time shift, ``shift * s / (1 + (shift - 1) * s)`` (3.0 for Turbo, 6.0 for Base).

    Restated from diffusers' ``FlowMatchEulerDiscreteScheduler`` (``set_timesteps`` in
    diffusers/schedulers/scheduling_flow_match_euler_discrete.py, 0.42.1), so training draws the noise levels that
    sampling visits; ``tests/test_flow.py`` checks the two agree."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def sample_sigmas(
    n: int,
    timestep_type: str,
    bias: str,
    generator: torch.Generator,
    shift: float = 3.0,
) -> torch.Tensor:
    """Draw ``n`` noise levels.

    - ``linear`` and ``weighted``: uniform in [0, 1] (``weighted`` reweights the loss instead, see
      ``timestep_weights``);
    - ``sigmoid``: ``sigmoid(N(0, 1))``, concentrated around 0.5;
    - ``shift``: uniform, then the scheduler's shift: the distribution inference visits;
    - ``lognorm``: logit-normal centred on ``log(shift)``: ``sigmoid`` moved toward high noise the way the shift
      moves the sampling schedule (equal to shifting a ``sigmoid`` draw).
    """
    if timestep_type in ("linear", "weighted"):
        s = torch.rand(n, generator=generator)
    elif timestep_type == "sigmoid":
        s = torch.sigmoid(torch.randn(n, generator=generator))
    elif timestep_type == "shift":
        s = shift_sigma(torch.rand(n, generator=generator), shift)
    elif timestep_type == "lognorm":
        s = torch.sigmoid(torch.randn(n, generator=generator) + math.log(shift))
    else:
        raise ValueError(f"unknown timestep type {timestep_type!r}")
    return apply_bias(s, bias).clamp(SIGMA_MIN, 1.0)


def apply_bias(sigma: torch.Tensor, bias: str) -> torch.Tensor:
    """Monotone warps of [0, 1]: ``high_noise`` is ``1 - (1 - s)^2`` (uniform mean 0.5 -> 2/3), favouring
    composition and global style; ``low_noise`` is ``s^2`` (mean 1/3), favouring identity and fine detail."""
    if bias == "balanced":
        return sigma
    if bias == "high_noise":
        return 1.0 - (1.0 - sigma) ** 2
    if bias == "low_noise":
        return sigma**2
    raise ValueError(f"unknown timestep bias {bias!r}")


# The ``weighted`` curve: a floor plus a bump at high-mid noise. Near s = 0 the task is almost the identity
# (little to learn, noisy gradients); around s ~ 0.8 the model decides layout, identity and style, which is what a
# concept LoRA must learn; at s = 1 the input is pure noise. Normalised to mean 1 under uniform draws so the
# learning rate means the same as with ``linear``. Range: 0.52 (s = 0) .. 1.66 (s = 0.8); 1.21 at s = 1.
_W_FLOOR, _W_PEAK, _W_WIDTH = 0.45, 0.8, 0.2


def _weight_raw(sigma: torch.Tensor) -> torch.Tensor:
    return _W_FLOOR + torch.exp(-0.5 * ((sigma - _W_PEAK) / _W_WIDTH) ** 2)


def _weight_mean() -> float:
    # mean of the raw curve over U(0, 1), in closed form
    a, b = (0.0 - _W_PEAK) / _W_WIDTH, (1.0 - _W_PEAK) / _W_WIDTH
    bump = _W_WIDTH * math.sqrt(math.pi / 2) * (math.erf(b / math.sqrt(2)) - math.erf(a / math.sqrt(2)))
    return _W_FLOOR + bump


_W_MEAN = _weight_mean()


def timestep_weights(sigma: torch.Tensor, timestep_type: str) -> torch.Tensor:
    """Per-sample loss weights: the ``weighted`` curve, or ones."""
    if timestep_type == "weighted":
        return _weight_raw(sigma) / _W_MEAN
    return torch.ones_like(sigma)


def flow_loss(
    output: list[torch.Tensor] | torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Weighted MSE between the predicted velocity (``-output``) and ``noise - x0``, mean over the batch."""
    return guided_flow_loss(output, x0, noise, weights, None)[0]


def stack_velocity(output: list[torch.Tensor] | torch.Tensor, shape: torch.Size) -> torch.Tensor:
    pred = torch.stack([o.float() for o in output]) if isinstance(output, list) else output.float()
    return velocity_from_output(pred.reshape(shape))


def guided_flow_loss(
    output: list[torch.Tensor] | torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    weights: torch.Tensor,
    guidance_scale: float | None,
    loss: str = "mse",
    unconditional: list[torch.Tensor] | torch.Tensor | None = None,
    guidance_target: float = 3.0,
    cells: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to back-propagate, plain loss to log), ``loss`` one of ``elementwise_loss``'s (``train.loss``).

    With the guidance loss (``unconditional``: the model's output on the empty prompt, no gradient through it, as
    velocity ``u``), the target becomes ``u + g (target - u)``, g = ``guidance_target``. With differential guidance
    (scale ``k``) the target then becomes ``pred + k * (target - pred)`` (pred detached): for mse the same loss
    direction with ``k`` times its gradient. The plain loss is always against the data's own target. ``cells``
    (B, H, W): a weight per latent cell (loss masks), on every channel."""
    pred = stack_velocity(output, x0.shape)
    target = flow_target(x0.float(), noise.float())
    plain = _weighted_loss(pred, target, weights, loss, cells)
    trained = target
    if unconditional is not None:
        trained = guidance_loss_target(stack_velocity(unconditional, x0.shape).detach(), target, guidance_target)
    if guidance_scale is not None:
        trained = differential_guidance_target(pred, trained, guidance_scale)
    if trained is target:
        return plain, plain
    return _weighted_loss(pred, trained, weights, loss, cells), plain.detach()


def guidance_loss_target(unconditional: torch.Tensor, target: torch.Tensor, g: float) -> torch.Tensor:
    """``u + g (target - u)``: the data's velocity extrapolated away from the empty prompt's, as CFG with scale g."""
    return unconditional + g * (target - unconditional)


def differential_guidance_target(pred: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
    fixed = pred.detach()
    return fixed + scale * (target - fixed)


PSEUDO_HUBER_C = 0.01  # AI Toolkit's constant: quadratic below about c, linear above


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """The loss of each element: ``mse`` d^2, ``mae`` |d|, ``pseudo_huber`` sqrt(d^2 + c^2) - c (d = pred - target)."""
    d = pred - target
    if loss == "mse":
        return d**2
    if loss == "mae":
        return d.abs()
    if loss == "pseudo_huber":
        return torch.sqrt(d**2 + PSEUDO_HUBER_C**2) - PSEUDO_HUBER_C
    raise ValueError(f"unknown loss {loss!r}")


def _weighted_loss(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, loss: str, cells: torch.Tensor | None = None
) -> torch.Tensor:
    elements = elementwise_loss(pred, target, loss)
    if cells is not None:
        elements = elements * cells.to(elements)[:, None]
    per_item = elements.flatten(1).mean(1)
    return (per_item * weights.to(per_item)).mean()

"""Optimizers and learning-rate schedules: the schedule's numbers, and that every optimizer really optimizes."""

from typing import get_args

import pytest
import torch

from zimage_lora.config import Optimizer, Scheduler
from zimage_lora.training.optim import build_optimizer, build_scheduler, lr_lambda

# --- schedules ---------------------------------------------------------------------------------------------------


def test_constant_is_one_everywhere():
    f = lr_lambda("constant", 0, 100)
    assert [f(i) for i in (0, 1, 50, 99, 100, 500)] == [1.0] * 6


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear"])
def test_warmup_is_linear_then_hands_over_at_full_lr(kind):
    f = lr_lambda(kind, 10, 110)
    assert [f(i) for i in range(10)] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert f(10) == pytest.approx(1.0)  # no jump: the schedule starts where warmup ends


def test_cosine_halves_at_the_midpoint_and_reaches_zero_at_the_end():
    f = lr_lambda("cosine", 10, 110)
    assert f(60) == pytest.approx(0.5)
    assert f(35) == pytest.approx(0.5 * (1 + 2**-0.5))
    assert f(110) == pytest.approx(0.0, abs=1e-12)
    assert f(200) == pytest.approx(0.0, abs=1e-12)  # stays at the floor past the end
    values = [f(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_linear_decays_to_zero():
    f = lr_lambda("linear", 0, 100)
    assert f(0) == 1.0
    assert f(25) == pytest.approx(0.75)
    assert f(50) == pytest.approx(0.5)
    assert f(100) == 0.0
    assert f(150) == 0.0


def test_schedule_without_warmup_or_steps_is_defined():
    # warmup as long as the run: span clamps to 1 and the last step is the floor, never a division by zero
    f = lr_lambda("cosine", 5, 5)
    assert [f(i) for i in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert f(5) == pytest.approx(1.0) and f(6) == pytest.approx(0.0, abs=1e-12)


def test_unknown_scheduler_raises():
    with pytest.raises(ValueError, match="bogus"):
        lr_lambda("bogus", 0, 10)(0)


def test_scheduler_drives_the_optimizers_lr():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.2)
    sched = build_scheduler(opt, "linear", warmup_steps=2, total_steps=6)
    seen = []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1, 0.2, 0.2, 0.15, 0.1, 0.05, 0.0])


# --- optimizers --------------------------------------------------------------------------------------------------


def least_squares(n: int = 64, seed: int = 0):
    """min ||X W - Y||^2 over an n x n W; n = 64 gives 4096 elements, the least bitsandbytes keeps in 8 bits."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=g)
    y = x @ torch.randn(n, n, generator=g)
    w = torch.nn.Parameter(torch.zeros(n, n))

    def loss() -> torch.Tensor:
        return ((x @ w - y) ** 2).mean()

    return w, loss


def run_steps(opt, loss, steps: int) -> list[float]:
    history = []
    for _ in range(steps):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
        history.append(value.item())
    history.append(loss().item())
    return history


# Prodigy starts from a tiny step-size estimate (d0 = 1e-6) and grows it from the gradients it sees, so it gets more
# steps (on a smaller problem: at 64 x 64 its steps are 100x slower on CPU); ``lr`` multiplies its estimate.
@pytest.mark.parametrize(
    ("name", "lr", "n", "steps"),
    [("adamw", 0.05, 64, 30), ("adamw8bit", 0.05, 64, 30), ("adafactor", 0.05, 64, 30), ("prodigy", 1.0, 32, 150)],
)
def test_every_optimizer_reduces_a_least_squares_loss(name, lr, n, steps):
    w, loss = least_squares(n)
    opt = build_optimizer(name, [w], lr=lr, weight_decay=0.0)
    history = run_steps(opt, loss, steps)
    assert all(torch.isfinite(torch.tensor(history)))
    assert history[-1] < 0.1 * history[0], history[:: steps // 10]


def test_adamw8bit_keeps_its_state_in_eight_bits():
    w, loss = least_squares()
    opt = build_optimizer("adamw8bit", [w], lr=0.05, weight_decay=0.0)
    run_steps(opt, loss, 2)
    state = opt.state[w]
    assert state["state1"].dtype == torch.uint8 and state["state1"].shape == w.shape
    assert state["state2"].dtype == torch.uint8 and state["state2"].shape == w.shape


def test_adamw_uses_the_given_settings():
    w, _ = least_squares()
    opt = build_optimizer("adamw", [w], lr=3e-4, weight_decay=0.01)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["lr"] == 3e-4 and opt.param_groups[0]["weight_decay"] == 0.01


# (not prodigy: its decay is scaled by its step-size estimate, which a zero gradient never grows)
@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "adafactor"])
def test_weight_decay_is_applied(name):
    # with a zero gradient only the decay moves the weights, toward zero
    w = torch.nn.Parameter(torch.full((64, 64), 1.0))
    opt = build_optimizer(name, [w], lr=0.05, weight_decay=0.5)
    for _ in range(3):
        opt.zero_grad()
        (w * 0.0).sum().backward()
        opt.step()
    assert (w.detach() < 1.0).all(), w.flatten()[:4]


def test_unknown_optimizer_raises():
    w, _ = least_squares()
    with pytest.raises(ValueError, match="lion"):
        build_optimizer("lion", [w], lr=1e-3, weight_decay=0.0)


def test_config_offers_exactly_the_optimizers_and_schedules_built_here():
    w, _ = least_squares()
    for name in get_args(Optimizer):
        build_optimizer(name, [w], lr=1e-3, weight_decay=0.0)
    for kind in get_args(Scheduler):
        assert 0.0 <= lr_lambda(kind, 0, 10)(5) <= 1.0

"""The fixed-step solvers reproduce torchdiffeq's fixed-grid methods on DMF's alignment ODE.

The reference is torchdiffeq itself, on an alignment function A written here from
docs/op.md (the alignment function; index by index, float64), independent of dmf_export.
"""
import importlib

import pytest
import torch
import torchdiffeq

from dmf_export import solvers
from dmf_export.errors import DMFExportError
from dmf_export.solvers import METHODS, Alignment, FixedStepODE, linear_growth, tableau

TORCHDIFFEQ_FIXED_STEP = ("euler", "midpoint", "rk4", "heun2", "heun3")
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.[a-z]+` is deprecated")

QUERIES, WAY, GROUPS, PER_GROUP, HEIGHT, WIDTH = 2, 3, 4, 3, 5, 4
RELATIVE_TOLERANCE = 1e-6


def alignment_reference(x, meta_filter, groups, kernel):
    """A(x, F) of docs/op.md, for pairs x [P, c, h, w] and F [P, G·K, h, w].

    A[g·R + r, p] = Σ_k x[g·R + r, neighbour k of p] · Φ[g, p, k], Φ = F read in its raw
    row-major memory order as [G, h·w, K]; neighbours row-major over the window, zeros
    outside the image.
    """
    pairs, channels, height, width = x.shape
    taps = kernel * kernel
    half = kernel // 2
    phi = meta_filter.reshape(pairs, groups, height * width, taps)
    group_of_channel = torch.arange(channels) // (channels // groups)
    out = torch.zeros_like(x)
    for k in range(taps):
        dy, dx = k // kernel - half, k % kernel - half
        rows = torch.arange(height) + dy
        cols = torch.arange(width) + dx
        inside = ((rows >= 0) & (rows < height))[:, None] & ((cols >= 0) & (cols < width))[None, :]
        neighbour = x[:, :, rows.clamp(0, height - 1)][:, :, :, cols.clamp(0, width - 1)]
        neighbour = neighbour * inside
        # Φ[g(ch), p, k] for every channel ch of the group
        weight = phi[:, group_of_channel, :, k].reshape(pairs, channels, height, width)
        out += neighbour * weight
    return out


def alignment_problem(kernel, seed=0):
    """(query features [Q, c, h, w], meta-filter [Q·way, G·K, h, w]) in float64."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(QUERIES, GROUPS * PER_GROUP, HEIGHT, WIDTH, generator=generator,
                        dtype=torch.float64)
    logits = torch.randn(QUERIES * WAY, GROUPS * kernel * kernel, HEIGHT, WIDTH,
                         generator=generator, dtype=torch.float64)
    return query, torch.sigmoid(logits)


def torchdiffeq_solution(query, meta_filter, kernel, method, steps):
    start = query.repeat_interleave(WAY, dim=0)  # pair i = q·way + k holds query q

    def field(t, x):
        return torch.relu(alignment_reference(x, meta_filter, GROUPS, kernel))

    times = torch.tensor([0.0, 1.0], dtype=torch.float64)
    return torchdiffeq.odeint(field, start, times, method=method,
                              options={"step_size": 1.0 / steps})[-1]


def relative_error(actual, expected):
    return float((actual - expected).abs().max() / expected.abs().max())


class ReferenceField(FixedStepODE):
    """The solver under test, driving the reference alignment function."""

    def __init__(self, kernel, method, steps):
        super().__init__(method, steps)
        self.kernel = kernel

    def vector_field(self, y, context):
        return torch.relu(alignment_reference(y, context, GROUPS, self.kernel))


def alignment_ode_solution(module, query, meta_filter):
    """Run dmf_export.solvers.Alignment (state [Q, way|1, G, R, h, w]) and return [P, c, h, w]."""
    start = query.view(QUERIES, 1, GROUPS, PER_GROUP, HEIGHT, WIDTH)
    aligned = module(start, module.filter_taps(meta_filter, QUERIES, WAY))
    return aligned.reshape(QUERIES * WAY, GROUPS * PER_GROUP, HEIGHT, WIDTH)


def test_the_methods_are_torchdiffeqs_fixed_step_runge_kutta_methods():
    assert set(METHODS) == set(TORCHDIFFEQ_FIXED_STEP)
    assert set(METHODS) <= set(importlib.import_module("torchdiffeq._impl.odeint").SOLVERS)


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("method", TORCHDIFFEQ_FIXED_STEP)
def test_fixed_step_unroll_matches_torchdiffeq(method, steps, kernel):
    query, meta_filter = alignment_problem(kernel)
    expected = torchdiffeq_solution(query, meta_filter, kernel, method, steps)
    actual = ReferenceField(kernel, method, steps)(query.repeat_interleave(WAY, dim=0), meta_filter)
    assert relative_error(actual, expected) <= RELATIVE_TOLERANCE


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("method", TORCHDIFFEQ_FIXED_STEP)
def test_alignment_ode_matches_torchdiffeq(method, steps, kernel):
    query, meta_filter = alignment_problem(kernel, seed=1)
    expected = torchdiffeq_solution(query, meta_filter, kernel, method, steps)
    actual = alignment_ode_solution(Alignment(GROUPS, kernel, method, steps), query, meta_filter)
    assert relative_error(actual, expected) <= RELATIVE_TOLERANCE


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("method", ["heun3", "euler"])  # euler: no stage rows, an empty list
def test_scripted_alignment_ode_matches_torchdiffeq(method, kernel):
    query, meta_filter = alignment_problem(kernel, seed=2)
    expected = torchdiffeq_solution(query, meta_filter, kernel, method, 3)
    scripted = torch.jit.script(Alignment(GROUPS, kernel, method, 3))
    actual = alignment_ode_solution(scripted, query, meta_filter)
    assert relative_error(actual, expected) <= RELATIVE_TOLERANCE


@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("method", TORCHDIFFEQ_FIXED_STEP)
def test_kernel_1_closed_form_matches_torchdiffeq(method, steps):
    # x(1) = x + relu(x)·excess: the growth the head scores with, without the ODE state
    query, meta_filter = alignment_problem(1, seed=3)
    expected = torchdiffeq_solution(query, meta_filter, 1, method, steps)
    solver = Alignment(GROUPS, 1, method, steps)
    assert solver.closed_form
    excess = solver.growth_excess(meta_filter, QUERIES, WAY).unsqueeze(3)  # [Q, way, G, 1, h·w]
    start = query.view(QUERIES, 1, GROUPS, PER_GROUP, HEIGHT * WIDTH)
    actual = (start + torch.relu(start) * excess).reshape(QUERIES * WAY, GROUPS * PER_GROUP,
                                                           HEIGHT, WIDTH)
    assert relative_error(actual, expected) <= RELATIVE_TOLERANCE


def test_default_is_one_step_of_torchdiffeqs_rk4():
    solver = Alignment(GROUPS, 3)
    assert (solver.method, solver.steps) == ("rk4", 1)


def test_the_comparison_tells_the_methods_apart():
    # guards the tests above against a problem so tame that every method agrees
    query, meta_filter = alignment_problem(3)
    rk4 = torchdiffeq_solution(query, meta_filter, 3, "rk4", 1)
    euler = torchdiffeq_solution(query, meta_filter, 3, "euler", 1)
    assert relative_error(euler, rk4) > 1e-2


@pytest.mark.parametrize("method", ["rk45", "dopri5", "fixed_adams", "RK4", "", None])
def test_unknown_method_is_a_clear_error(method):
    with pytest.raises(DMFExportError, match="unknown ODE solver"):
        tableau(method)
    with pytest.raises(DMFExportError, match="unknown ODE solver"):
        Alignment(GROUPS, 1, method)


@pytest.mark.parametrize("steps", [0, -1, 1.5, "2", True])
def test_steps_must_be_a_positive_integer(steps):
    with pytest.raises(DMFExportError, match="steps"):
        Alignment(GROUPS, 1, "rk4", steps)


@pytest.mark.parametrize("method, expected", [
    # y' = z·y: one step multiplies y by the method's stability polynomial. Every
    # s-stage method of order s ≤ 4 gives the Taylor polynomial of e^z to degree s.
    ("euler", [1.0]),
    ("midpoint", [1.0, 1 / 2]),
    ("heun2", [1.0, 1 / 2]),
    ("heun3", [1.0, 1 / 2, 1 / 6]),
    ("rk4", [1.0, 1 / 2, 1 / 6, 1 / 24]),
])
def test_linear_growth_is_the_stability_polynomial(method, expected):
    assert linear_growth(method) == pytest.approx(expected, rel=1e-15)


def test_linear_growth_refuses_a_tableau_whose_stages_can_turn_negative(monkeypatch):
    # a (made-up) stage y - dt·k1 goes negative for z > 1: relu could clip it
    monkeypatch.setitem(solvers.TABLEAUX, "made_up", ([[-1.0]], [0.5, 0.5]))
    assert linear_growth("made_up") is None

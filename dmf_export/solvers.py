"""Fixed-step explicit Runge-Kutta on t in [0, 1], as plain tensor arithmetic.

DMF integrates its alignment ODE with torchdiffeq's ``odeint(..., method='rk4')`` on
the grid ``[0, 1]``: one step of the 3/8-rule Runge-Kutta. An exported graph cannot
call torchdiffeq, so the same steps are written here as plain tensor arithmetic with
fixed trip counts: ``torch.export`` unrolls them into a static graph, and
``torch.jit.script`` compiles them (as loops over the module's constant float lists).
Every method is one row of ``TABLEAUX``; a single loop (``FixedStepODE.forward``)
serves all of them.

DMF's vector field does not depend on t, so the tableaux carry no nodes (c_i).
``Alignment`` is that field on the deployment graph's state, with the closed form that
kernel 1 admits (``linear_growth``).
"""
from typing import Dict, Final, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmf_export.errors import DMFExportError

# method -> (stages, weights): stage i (i >= 1) evaluates f at
# y + dt * sum_j stages[i-1][j] * k_j; the step is y + dt * sum_j weights[j] * k_j.
# Transcribed from torchdiffeq 0.2.5 (_impl/fixed_grid.py, _impl/rk_common.py).
TABLEAUX: Dict[str, Tuple[List[List[float]], List[float]]] = {
    "euler": ([], [1.0]),
    "midpoint": ([[0.5]], [0.0, 1.0]),
    "heun2": ([[1.0]], [0.5, 0.5]),
    "heun3": ([[1.0 / 3.0], [0.0, 2.0 / 3.0]], [0.25, 0.0, 0.75]),
    # torchdiffeq's 'rk4' is rk4_alt_step_func, the 3/8 rule (not the classic 1/6 rule).
    "rk4": ([[1.0 / 3.0], [-1.0 / 3.0, 1.0], [1.0, -1.0, 1.0]],
            [0.125, 0.375, 0.375, 0.125]),
}
METHODS: Tuple[str, ...] = tuple(TABLEAUX)


def tableau(method: str) -> Tuple[List[List[float]], List[float]]:
    """The (stages, weights) of ``method``; DMFExportError for a name not in TABLEAUX."""
    if not isinstance(method, str) or method not in TABLEAUX:
        raise DMFExportError(
            f"unknown ODE solver {method!r}: choose one of {', '.join(METHODS)} "
            "(fixed-step methods only)")
    stages, weights = TABLEAUX[method]
    return [list(row) for row in stages], list(weights)


def check_steps(steps) -> int:
    """``steps`` as a positive int; DMFExportError otherwise."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DMFExportError(f"the number of ODE steps must be an integer >= 1, got {steps!r}")
    return steps


def _combine(slopes: List[Tensor], coefficients: List[float]) -> Tensor:
    """sum_j coefficients[j] * slopes[j], skipping zero terms and multiplications by +-1.

    Skipping them keeps the graph small and makes the rk4 stages round exactly like
    torchdiffeq's ``k2 - k1 * (1/3)`` and ``k1 - k2 + k3``.
    """
    total: Optional[Tensor] = None
    for j in range(len(coefficients)):
        c = coefficients[j]
        if c == 0.0:
            continue
        if total is None:
            if c == 1.0:
                total = slopes[j]
            else:
                total = slopes[j] * c
        elif c == 1.0:
            total = total + slopes[j]
        elif c == -1.0:
            total = total - slopes[j]
        else:
            total = total + slopes[j] * c
    assert total is not None, "a Runge-Kutta row with no non-zero coefficient"
    return total


class FixedStepODE(nn.Module):
    """Integrates dy/dt = vector_field(y, context) from t = 0 to t = 1 in ``steps`` equal steps.

    Subclasses define ``vector_field``; ``context`` is a tensor the field reads but the
    solver does not evolve (DMF's meta-filter, whose dF/dt = 0). ``forward(y0, context)``
    returns y(1). Scriptable and exportable: the table is plain floats, the loops have
    fixed trip counts, and ``y`` may broadcast against the field's output (its shape
    after the first stage is the broadcast shape).
    """

    stages: List[List[float]]
    weights: List[float]
    steps: int
    dt: float

    def __init__(self, method: str = "rk4", steps: int = 1):
        super().__init__()
        self.method = method
        self.stages, self.weights = tableau(method)
        self.steps = check_steps(steps)
        self.dt = 1.0 / steps

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # TorchScript reads only the module class's own annotations, and cannot infer the
        # type of euler's empty stage list: a subclass that annotates anything keeps these
        cls.__annotations__ = {**FixedStepODE.__annotations__,
                               **cls.__dict__.get("__annotations__", {})}

    def extra_repr(self) -> str:
        return f"method={self.method!r}, steps={self.steps}"

    def vector_field(self, y: Tensor, context: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, y0: Tensor, context: Tensor) -> Tensor:
        y = y0
        for _ in range(self.steps):
            slopes: List[Tensor] = [self.vector_field(y, context)]
            for row in self.stages:
                slopes.append(self.vector_field(y + self._times_dt(_combine(slopes, row)), context))
            y = y + self._times_dt(_combine(slopes, self.weights))
        return y

    def _times_dt(self, increment: Tensor) -> Tensor:
        # one step (the original) has dt = 1: no multiplication in the graph
        if self.dt == 1.0:
            return increment
        return increment * self.dt


def _poly_mul(a: List[float], b: List[float]) -> List[float]:
    out = [0.0] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] += x * y
    return out


def _poly_add(a: List[float], b: List[float]) -> List[float]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0.0) + (b[i] if i < len(b) else 0.0) for i in range(n)]


def linear_growth(method: str) -> Optional[List[float]]:
    """One step of ``method`` on y' = z·y is y·R(z); returns [r_1, …, r_s] with
    R(z) = 1 + Σ r_j z^j (the stability polynomial), or None when some stage or R has a
    negative coefficient.

    Non-negative coefficients mean that for y > 0 and z ≥ 0 every stage value stays
    positive. That is what lets DMF's kernel-1 alignment, dy/dt = relu(y·F) with
    F = sigmoid(…) ≥ 0, be solved in closed form: relu never clips a positive y, so each
    element follows the linear ODE (y(1) = y·R(F·dt)^steps), and a y ≤ 0 never moves.
    """
    stages, weights = tableau(method)
    one = [1.0]
    z = [0.0, 1.0]
    values = [one]  # stage values Y_i / y as polynomials in z (Y_1 = y)
    for row in stages:
        value = one
        for j, a in enumerate(row):
            value = _poly_add(value, [a * c for c in _poly_mul(z, values[j])])
        values.append(value)
    growth = one
    for j, b in enumerate(weights):
        growth = _poly_add(growth, [b * c for c in _poly_mul(z, values[j])])
    if any(c < 0.0 for value in values + [growth] for c in value):
        return None
    return growth[1:]


class Alignment(FixedStepODE):
    """dx/dt = relu(A(x, F)) with F constant, integrated over [0, 1] by a fixed-step solver.

    The state x is ``[Q, way or 1, G, R, h, w]`` (channel g·R + r of pair q·way + k); it
    starts as the query features ``[Q, 1, G, R, h, w]`` and broadcasts against the
    filter taps. ``context`` holds the filter as taps ``[K, Q, way, G, 1, h, w]``
    (``filter_taps``), prepared once per episode since dF/dt = 0.

    Kernel 1 has a closed form (``closed_form``, see ``linear_growth``), exact in real
    arithmetic for every method in the table: ``growth_excess`` gives it without the
    state; kernel 3 mixes neighbours inside the relu and is unrolled step by step.
    """

    kernel: Final[int]
    groups: Final[int]
    closed_form: Final[bool]
    growth: List[float]

    def __init__(self, groups: int, kernel: int, method: str = "rk4", steps: int = 1):
        super().__init__(method, steps)
        self.groups = groups
        self.kernel = kernel
        growth = linear_growth(method) if kernel == 1 else None
        self.closed_form = growth is not None
        # R(z) − 1 = Σ_j growth[j] z^(j+1) with dt folded in
        self.growth = [c * self.dt ** (j + 1) for j, c in enumerate(growth or [])]

    def extra_repr(self) -> str:
        return f"groups={self.groups}, kernel={self.kernel}, " + super().extra_repr()

    @torch.jit.export
    def filter_taps(self, meta_filter: Tensor, queries: int, way: int) -> Tensor:
        """``[P, G·K, h, w] -> [K, Q, way, G, 1, h, w]``.

        Quirk (docs/op.md): the filter is read in its raw memory order as
        Φ = [P, G, h·w, K], so for K = 9 tap k of position p is NOT channel g·9 + k.
        """
        height = meta_filter.size(2)
        width = meta_filter.size(3)
        taps = self.kernel * self.kernel
        # flatten first: a plain split of one axis keeps dynamic h, w free of guards
        phi = meta_filter.flatten(1).view(queries, way, self.groups, height, width, taps)
        if taps == 1:
            return phi.permute(5, 0, 1, 2, 3, 4).unsqueeze(4)
        return phi.permute(5, 0, 1, 2, 3, 4).contiguous().unsqueeze(4)

    def vector_field(self, y: Tensor, context: Tensor) -> Tensor:
        if self.kernel == 1:
            return torch.relu(y * context[0])
        height = y.size(4)
        width = y.size(5)
        padded = F.pad(y, [1, 1, 1, 1])
        # neighbour k = (i, j) of position (r, c) is (r + i - 1, c + j - 1), row-major taps
        total = padded[:, :, :, :, 0:height, 0:width] * context[0]
        for k in range(1, 9):
            i = k // 3
            j = k % 3
            total = total + padded[:, :, :, :, i:i + height, j:j + width] * context[k]
        return torch.relu(total)

    @torch.jit.export
    def growth_excess(self, meta_filter: Tensor, queries: int, way: int) -> Tensor:
        """``[P, G, h, w] -> [Q, way, G, h·w]``: R(F·dt)^steps − 1, for kernel 1.

        Per element, x(1) = x + relu(x)·(R(F·dt)^steps − 1): relu never clips a positive
        x and a negative x never moves (``linear_growth``).
        """
        filters = meta_filter.flatten(2).view(queries, way, self.groups, -1)  # F[q,k,g,p]
        # Horner, without the leading 1 (in place: [Q, way, G, h·w] is large for G = 640,
        # and each fresh tensor page-faults)
        excess = filters * self.growth[-1]
        for j in range(len(self.growth) - 2, -1, -1):
            excess = excess.add_(self.growth[j]).mul_(filters)
        step_excess = excess
        for _ in range(self.steps - 1):  # (1 + a)(1 + b) − 1 = a + b + ab
            excess = excess + step_excess + excess * step_excess
        return excess

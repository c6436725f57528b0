"""Fixed-step explicit Runge-Kutta on t in [0, 1], as plain tensor arithmetic.

DMF integrates its alignment ODE with torchdiffeq's ``odeint(..., method='rk4')`` on
the grid ``[0, 1]``: one step of the 3/8-rule Runge-Kutta. An exported graph cannot
call torchdiffeq, so the same steps are written here as plain tensor arithmetic with
fixed trip counts: ``torch.export`` unrolls them into a static graph, and
``torch.jit.script`` compiles them (as loops over the module's constant float lists).
Every method is one row of ``TABLEAUX``; a single loop (``FixedStepODE.forward``)
serves all of them.

DMF's vector field does not depend on t, so the tableaux carry no nodes (c_i).
"""
from typing import Dict, List, Optional, Tuple

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

"""Parity of an artifact with the eager original on seeded random episodes."""
from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Callable, Sequence

import torch

from dmf_export.checkpoint import load_checkpoint
from dmf_export.contract import TOLERANCES, VERIFY_SIZES, EpisodeSize, Tolerance, make_episode, unique
from dmf_export.errors import DMFExportError
from dmf_export.formats import open_artifact
from dmf_export.triton.remote import DEFAULT_TIMEOUT, open_server


@dataclasses.dataclass
class SizeResult:
    size: str
    max_abs: float
    max_rel: float
    agreement: float  # fraction of queries whose arg-max is the eager model's
    near_ties: int  # queries that disagree only where the eager model's scores tie within tolerance
    passed: bool
    # the largest |a − b| ÷ (atol + rtol·|b|): the share of the tolerance used (≤ 1 passes)
    tolerance_used: float | None = None


@dataclasses.dataclass
class Report:
    artifact: str
    backend: str
    precision: str
    tolerance: Tolerance
    results: list[SizeResult]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["passed"] = self.passed
        return out


def compare(scores: torch.Tensor, expected: torch.Tensor, tol: Tolerance, size: str) -> SizeResult:
    """Elementwise |a − b| ≤ atol + rtol·|b| (numpy.allclose's rule) and arg-max agreement.

    A query whose arg-max differs counts against ``min_agreement`` unless the eager model
    itself scores the two classes within the tolerance (a near-tie: at fp16, whose step at
    a score of 12 is 0.008, a gap of 1e-4 between two classes is not there to be seen).
    """
    scores, expected = scores.detach().double().cpu(), expected.detach().double().cpu()
    if scores.shape != expected.shape or scores.dim() != 2:
        return SizeResult(size, float("inf"), float("inf"), 0.0, 0, False)
    diff = (scores - expected).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    max_rel = float((diff / expected.abs().clamp_min(1e-12)).max()) if diff.numel() else 0.0
    finite = bool(torch.isfinite(scores).all())
    allowed = tol.atol + tol.rtol * expected.abs()
    close = bool((diff <= allowed).all())
    used = float((diff / allowed.clamp_min(1e-300)).max()) if diff.numel() else 0.0
    if not scores.numel():
        return SizeResult(size, max_abs, max_rel, 1.0, 0, finite and close, used)
    picked = scores.argmax(1)
    same = picked == expected.argmax(1)
    best = expected.max(1).values
    shortfall = best - expected.gather(1, picked.unsqueeze(1)).squeeze(1)  # ≥ 0
    tie = ~same & (shortfall <= tol.atol + tol.rtol * best.abs())
    agreement = float(same.double().mean())
    accepted = float((same | tie).double().mean())
    return SizeResult(size, max_abs, max_rel, agreement, int(tie.sum()),
                      finite and close and accepted >= tol.min_agreement, used)


def verify_artifact(artifact: str | None, checkpoint: str, *, provider: str = "cpu", device: str = "cpu",
                    sizes: Sequence[EpisodeSize] | None = None, seed: int = 0,
                    rtol: float | None = None, atol: float | None = None,
                    min_agreement: float | None = None, cuda_graph: bool = False, tf32: bool = False,
                    plugin: str | None = None, servers: Sequence[str] = (), protocol: str = "http",
                    timeout: float = DEFAULT_TIMEOUT, clients: int = 1,
                    log: Callable[[str], None] = lambda _: None) -> Report:
    """Compare ``artifact`` (or, with ``servers``, the Triton servers' answers) with the
    eager model of ``checkpoint`` on seeded episodes. With ``clients`` > 1 the episodes
    are sent that many at a time (a server's answers must not depend on what else it runs)."""
    if servers and artifact:
        raise DMFExportError("give an ARTIFACT or --server, not both")
    if not servers and not artifact:
        raise DMFExportError("give an ARTIFACT to verify, or --server HOST:PORT")
    if servers:
        runner = open_server(servers, protocol=protocol, timeout=timeout)
    else:
        runner = open_artifact(artifact, provider=provider, device=device, cuda_graph=cuda_graph,
                               tf32=tf32, plugin=plugin)
    info = runner.info
    try:
        # a server does not say the export's groups and kernel (read from the weights) nor its
        # solver: the original's (rk4, one step) unless the artifact says otherwise
        model = load_checkpoint(checkpoint, groups=info.groups, kernel=info.kernel)
    except BaseException:
        runner.close()
        raise
    solver, steps = info.solver or "rk4", info.steps or 1
    if servers:
        log(f"  serving {', '.join(runner.graphs)}; compared with the eager model at {solver}, "
            f"{steps} step{'s' if steps != 1 else ''} (a server does not say the export's solver)")
    default = TOLERANCES[info.precision]
    tol = Tolerance(rtol if rtol is not None else default.rtol,
                    atol if atol is not None else default.atol,
                    min_agreement if min_agreement is not None else default.min_agreement)
    if sizes is None:
        sizes = list(VERIFY_SIZES)
        if info.example:
            example = EpisodeSize(**info.example)
            # the export-time size, capped so the eager original stays quick on a CPU
            sizes.insert(0, EpisodeSize(example.way, example.shot, min(example.queries, 15)))
    sizes = unique(sizes)
    episodes = [make_episode(size, info.image_size, seed=seed + i) for i, size in enumerate(sizes)]
    results = []
    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, min(clients, len(episodes)))) as pool:
            # the runner's answers first (concurrently with --clients), then each compared
            answers = list(pool.map(lambda episode: runner(*episode), episodes)) if clients > 1 else None
        for i, (size, episode) in enumerate(zip(sizes, episodes)):
            with torch.inference_mode():
                expected = model(*episode, method=solver, steps=steps)
            scores = answers[i] if answers is not None else runner(*episode)
            result = compare(scores, expected, tol, str(size))
            log(f"  {size}: max abs {result.max_abs:.2e}, max rel {result.max_rel:.2e}, "
                f"agreement {result.agreement:.0%}{describe_ties(result.near_ties)} "
                f"{'ok' if result.passed else 'FAIL'}")
            results.append(result)
    finally:
        runner.close()
    return Report(str(artifact or runner.path), runner.backend, info.precision, tol, results)


def describe_ties(count: int) -> str:
    """' (+N near-ties)' after an agreement figure, or nothing."""
    return f" (+{count} near-tie{'s' if count != 1 else ''})" if count else ""

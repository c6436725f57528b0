"""The DMF few-shot classifier (Xu et al., CVPR 2021), eval forward of the original code.

This is the eager reference that every export is measured against, so it keeps the
original formulation (torchdiffeq ``odeint`` with ``rk4`` over [0, 1], the alignment
as unfold + batched matmul) and every quirk of the original (docs/op.md, "DMF eval forward"), each marked where it is
reproduced.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchdiffeq import odeint

from dmf_export import ops
from dmf_export.contract import FEATURE_CHANNELS, HEAD_INPUTS, check_episode
from dmf_export.errors import DMFExportError

from .resnet12 import ResNet12

OFFSET_KERNEL = 5
DEFORM_KERNEL = 3


def check_groups_kernel(groups: int | None, kernel: int | None) -> None:
    """Raise DMFExportError unless groups divides 640 and kernel is 1 or 3 (None: unchecked)."""
    if kernel is not None and kernel not in (1, 3):
        raise DMFExportError(f"kernel must be 1 or 3, got {kernel}")
    if groups is not None and (groups < 1 or FEATURE_CHANNELS % groups):
        raise DMFExportError(
            f"groups must divide {FEATURE_CHANNELS} (e.g. 64, 160, 320, 640), got {groups}")


class DeformConv2d(nn.Module):
    """DCNv1, 3×3, stride 1, pad 1, one offset group, no bias: only a weight to hold."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        ops.require()  # every model runs, scripts or exports the op: build it now if needed
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels, DEFORM_KERNEL, DEFORM_KERNEL))
        nn.init.kaiming_uniform_(self.weight, a=1.0)

    def extra_repr(self) -> str:
        out_channels, in_channels = self.weight.shape[:2]
        return f"{in_channels}, {out_channels}, kernel_size=3, padding=1, bias=False"

    def forward(self, input: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return ops.deform_conv2d(input, offsets, self.weight, stride=1, padding=1,
                                 dilation=1, groups=1, offset_groups=1)


class MetaFilterGenerator(nn.Module):
    """``dw_gen``: offsets from (query, support), then the meta-filter from the support."""

    def __init__(self, channels: int, groups: int, kernel: int):
        super().__init__()
        taps = DEFORM_KERNEL * DEFORM_KERNEL
        self.off_conv = nn.Conv2d(2 * channels, 2 * taps, OFFSET_KERNEL,
                                  padding=OFFSET_KERNEL // 2, bias=False)
        self.kernel_conv = DeformConv2d(channels, groups * kernel * kernel)

    def forward(self, support_pairs: torch.Tensor, query_pairs: torch.Tensor) -> torch.Tensor:
        # query channels first, as in the original's cat([query, support], 1)
        offsets = self.off_conv(torch.cat([query_pairs, support_pairs], 1))
        return torch.sigmoid(self.kernel_conv(support_pairs, offsets))


class AlignmentODE(nn.Module):
    """dx/dt = relu(A(x, F)), dF/dt = 0, in the original's unfold + bmm formulation."""

    def __init__(self, groups: int, kernel: int):
        super().__init__()
        self.groups = groups
        self.kernel = kernel

    def extra_repr(self) -> str:
        return f"groups={self.groups}, kernel={self.kernel}"

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        aligned, meta_filter = state
        n, c, h, w = aligned.shape
        groups, taps = self.groups, self.kernel * self.kernel
        per_group = c // groups
        neighbours = F.unfold(aligned, self.kernel, padding=self.kernel // 2)  # [n, c·K, h·w]
        neighbours = (neighbours.view(n, c, taps, h * w).permute(0, 1, 3, 2)
                      .reshape(n, groups, per_group, h * w, taps).permute(0, 1, 3, 2, 4)
                      .reshape(n * groups * h * w, per_group, taps))
        # Quirk: the filter [n, G·K, h, w] is read in its raw memory order as
        # [n·G·h·w, K]; for K = 9 that is not "tap k = channel g·9 + k".
        filters = meta_filter.reshape(-1, taps, 1)
        out = torch.bmm(neighbours, filters)
        out = out.view(n, groups, h * w, per_group).permute(0, 1, 3, 2).reshape(n, c, h, w)
        return F.relu(out), torch.zeros_like(meta_filter)


class DMF(nn.Module):
    """``model(support, support_labels, query) -> scores [Q, way]`` for one episode.

    support ``[S, 3, H, W]`` and query ``[Q, 3, H, W]`` are normalised images, support
    labels ``[S, way]`` one-hot. Always eval semantics: BN uses its running statistics
    and no buffer changes, whatever ``.train()`` says.
    """

    def __init__(self, groups: int = 64, kernel: int = 1, num_classes: int = 64):
        super().__init__()
        groups, kernel, num_classes = int(groups), int(kernel), int(num_classes)
        check_groups_kernel(groups, kernel)
        if num_classes < 1:
            raise DMFExportError(f"num_classes must be positive, got {num_classes}")
        self.groups = groups
        self.kernel = kernel
        self.num_classes = num_classes
        self.base = ResNet12()
        # sic: the original's spelling; used only in training, kept for strict loading
        self.global_clasifier = nn.Conv2d(FEATURE_CHANNELS, num_classes, kernel_size=1)
        self.dw_gen = MetaFilterGenerator(FEATURE_CHANNELS, groups, kernel)
        self.alignment = AlignmentODE(groups, kernel)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, kernel={self.kernel}, num_classes={self.num_classes}"

    # -- the episode, step by step -------------------------------------------------

    def forward(self, support: torch.Tensor, support_labels: torch.Tensor,
                query: torch.Tensor, method: str = "rk4", steps: int = 1) -> torch.Tensor:
        """``method``/``steps``: another torchdiffeq fixed-grid solver, for checking exports
        made with ``--solver``/``--steps``; the defaults are the original."""
        self._check_episode(support, support_labels, query)
        features = self.base(torch.cat([support, query], 0))
        shots = support.shape[0]
        return self.head(features[:shots], support_labels, features[shots:], method, steps)

    def head(self, support_features: torch.Tensor, support_labels: torch.Tensor,
             query_features: torch.Tensor, method: str = "rk4", steps: int = 1) -> torch.Tensor:
        """Scores ``[Q, way]`` from backbone features (the split graph's second half)."""
        self._check_features(support_features, support_labels, query_features)
        prototypes = self.prototypes(support_features, support_labels)
        support_pairs, query_pairs = self.pairs(prototypes, query_features)
        meta_filter = self.dw_gen(support_pairs, query_pairs)
        aligned = self.align(query_pairs, meta_filter, method, steps)
        scores = self.score(aligned, support_pairs)
        return scores.view(query_features.shape[0], prototypes.shape[0])

    @staticmethod
    def prototypes(support_features: torch.Tensor, support_labels: torch.Tensor) -> torch.Tensor:
        """Class means ``[way, c, h, w]``: one-hotᵀ · features / shots per class."""
        labels = support_labels.to(support_features.dtype)
        flat = support_features.reshape(support_features.shape[0], -1)
        sums = labels.t() @ flat
        prototypes = sums / labels.sum(0).unsqueeze(1)
        return prototypes.view(labels.shape[1], *support_features.shape[1:])

    @staticmethod
    def pairs(prototypes: torch.Tensor, query_features: torch.Tensor):
        """(support_pairs, query_pairs) ``[Q·way, c, h, w]``, query-major: i = q·way + k."""
        way, queries = prototypes.shape[0], query_features.shape[0]
        shape = prototypes.shape[1:]
        # The original's clone().view() fails on PyTorch >= 1.5; the intended order is
        # the contiguous one.
        support_pairs = prototypes.unsqueeze(0).expand(queries, way, *shape).reshape(-1, *shape)
        query_pairs = query_features.unsqueeze(1).expand(queries, way, *shape).reshape(-1, *shape)
        return support_pairs, query_pairs

    def align(self, query_pairs: torch.Tensor, meta_filter: torch.Tensor,
              method: str = "rk4", steps: int = 1) -> torch.Tensor:
        """x(1) of the alignment ODE from x(0) = query, as torchdiffeq's rk4 on [0, 1]."""
        # One 3/8-rule step; the state is the tuple (x, F) with dF/dt = 0, as in the
        # original (rtol/atol have no effect on a fixed-grid solver).
        times = torch.tensor([0.0, 1.0], dtype=query_pairs.dtype, device=query_pairs.device)
        options = None if steps == 1 else {"step_size": 1.0 / steps}
        trajectory = odeint(self.alignment, (query_pairs, meta_filter), times, method=method,
                            options=options)
        return trajectory[0][1]

    @staticmethod
    def score(aligned: torch.Tensor, support_pairs: torch.Tensor) -> torch.Tensor:
        """Per-pair score ``[Q·way]``: aligned query · mean L2-normalised support."""
        pairs, channels, height, width = aligned.shape
        weights = F.normalize(support_pairs, p=2, dim=1, eps=1e-12)
        weights = weights.mean(-1, keepdim=True).mean(-2, keepdim=True)  # [pairs, c, 1, 1]
        # Quirk: a grouped 1×1 conv with padding 1, then the spatial mean, so the zero
        # border counts: the sum is divided by (h+2)(w+2) = 169, not h·w.
        maps = F.conv2d(aligned.reshape(1, pairs * channels, height, width), weights,
                        groups=pairs, padding=1)
        return maps.mean(-1).mean(-1).view(pairs)

    # -- input checks --------------------------------------------------------------

    def _check_episode(self, support, support_labels, query) -> None:
        check_episode(support, support_labels, query, image_size=None,
                      precision=self._precision())
        if support.dtype != query.dtype:
            raise DMFExportError(
                f"support and query differ in dtype: {support.dtype} vs {query.dtype}")
        weight = self.dw_gen.off_conv.weight
        if support.dtype != weight.dtype:
            raise DMFExportError(
                f"inputs are {support.dtype} but the model is {weight.dtype}; "
                f"convert one of them (e.g. model.to({support.dtype}))")

    def _check_features(self, support_features, support_labels, query_features) -> None:
        check_episode(support_features, support_labels, query_features, image_size=None,
                      precision=self._precision(), channels=FEATURE_CHANNELS, names=HEAD_INPUTS)

    def _precision(self) -> str:
        dtype = self.dw_gen.off_conv.weight.dtype
        return {torch.float16: "fp16", torch.float64: "fp64"}.get(dtype, "fp32")

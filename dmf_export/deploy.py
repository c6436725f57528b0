"""The deployment graph of a DMF episode, the one module every exporter starts from.

``build_episode_graph(model)`` turns the eager DMF model (``dmf_export.models.DMF``)
into a module that computes the same scores (exact in real arithmetic) in a form that
``torch.jit.script`` and ``torch.export`` accept and that runs fast:

- the backbone with batch norm folded into its convolutions;
- prototypes as one-hotᵀ · features / counts;
- the meta-filter (``MetaFilter``): the offset conv over cat(query, prototype) split by
  input channels into a query part (once per query) and a prototype part (once per
  class), broadcast-added per pair, then one of two ways to compute the deformable conv;
- the alignment function as element-wise products (no unfold, no batched matmul),
  its ODE unrolled by ``dmf_export.solvers.Alignment`` from the query features broadcast
  over the classes, so the query is never copied per pair (kernel 1: in closed form);
- the score as one weighted sum.

S, way and Q stay dynamic under ``torch.jit.script`` and ``torch.export``; H and W
under ``torch.jit.script`` (from torch 2.11 the head also exports with dynamic h, w; the
episode graph does not, because ``torch.export`` cannot prove the ceil-mode pooling's
size guards). torch 2.11's ``torch.export`` needs
``prefer_deferred_runtime_asserts_over_guards=True`` for a dynamic ``way`` with kernel 1
(``torch.onnx.export`` passes it; 2.13 does without).
dtype follows the inputs and weights.
"""
from typing import Final, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmf_export.errors import DMFExportError
from dmf_export.models.dmf import FEATURE_CHANNELS
from dmf_export.solvers import Alignment, check_steps, tableau

LEAKY_SLOPE = 0.1
TAPS = 9  # the meta-filter DCN is 3×3
NORM_EPS = 1e-12


# -- backbone ----------------------------------------------------------------------

def fold_batch_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """conv followed by eval-mode BN as one conv with bias (folded in float64)."""
    with torch.no_grad():
        weight = conv.weight.detach().double()
        scale = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.detach().double()
        shift = -bn.running_mean.detach().double()
        if conv.bias is not None:
            shift = shift + conv.bias.detach().double()
        bias = shift * scale
        if bn.bias is not None:
            bias = bias + bn.bias.detach().double()
        folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                           stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                           groups=conv.groups, bias=True, padding_mode=conv.padding_mode,
                           device=conv.weight.device, dtype=conv.weight.dtype)
        folded.weight.copy_(weight * scale.view(-1, 1, 1, 1))
        folded.bias.copy_(bias)
    return folded.requires_grad_(False)


class FoldedBlock(nn.Module):
    """A ResNet-12 block with BN folded: three 3×3 convs and a 1×1 shortcut, all with bias."""

    pool: Final[bool]
    negative_slope: Final[float] = LEAKY_SLOPE

    def __init__(self, block: nn.Module):
        super().__init__()
        self.conv1 = fold_batch_norm(block.conv1, block.bn1)
        self.conv2 = fold_batch_norm(block.conv2, block.bn2)
        self.conv3 = fold_batch_norm(block.conv3, block.bn3)
        self.shortcut = fold_batch_norm(block.downsample[0], block.downsample[1])
        self.pool = bool(block.pool)

    def forward(self, x: Tensor) -> Tensor:
        # in place: each conv's output is fresh, and a CPU allocator returns large blocks to
        # the system, so every new activation-sized tensor costs page faults
        out = F.leaky_relu(self.conv1(x), self.negative_slope, inplace=True)
        out = F.leaky_relu(self.conv2(out), self.negative_slope, inplace=True)
        out = F.leaky_relu(self.conv3(out).add_(self.shortcut(x)), self.negative_slope,
                           inplace=True)
        if self.pool:
            # ceil_mode: 21 → 11 in the third block
            out = F.max_pool2d(out, kernel_size=2, stride=2, padding=0, dilation=1,
                               ceil_mode=True)
        return out


class Encoder(nn.Module):
    """``images [N, 3, H, W] -> features [N, 640, h, w]``: ResNet-12, BN folded, eval.

    Runs channels-last inside (oneDNN's convolutions are about 1.5× faster so on a CPU,
    and GPUs prefer it too); takes and returns ordinary contiguous tensors. On a CPU it
    encodes ``cpu_batch`` images at a time (0: all at once): a block's activations for 16
    84×84 images stay in the cache between its convolutions, and the encoder ran 1.3× faster
    so (2-core AMD EPYC). Per image the arithmetic is the same. The TorchScript exporter
    sets 16; the default 0 suits ``torch.export`` (a loop over a dynamic batch does not
    export, and onnxruntime plans its own memory).
    """

    cpu_batch: Final[int]

    def __init__(self, backbone: nn.Module, cpu_batch: int = 0):
        super().__init__()
        self.blocks = nn.Sequential(*[FoldedBlock(getattr(backbone, f"layer{n}")[0])
                                      for n in range(1, 5)])
        self.blocks.to(memory_format=torch.channels_last)
        self.cpu_batch = int(cpu_batch)

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.size(1) != 3:
            raise ValueError("images must be [N, 3, H, W]")
        images = images.contiguous(memory_format=torch.channels_last)
        if self.cpu_batch > 0 and images.device.type == "cpu" and images.size(0) > self.cpu_batch:
            parts = [self.blocks(part) for part in images.split(self.cpu_batch)]
            return torch.cat(parts).contiguous()
        return self.blocks(images).contiguous()


class Bfloat16Encoder(nn.Module):
    """``images [N, 3, H, W] -> features [N, 640, h, w]``, fp32 in and out, the backbone's
    convolutions in bfloat16 inside (``--precision bf16``).

    oneDNN's bf16 convolutions (AMX, AVX-512-BF16) multiply bf16 and accumulate in fp32;
    each activation is stored in bf16 between them (8 bits of mantissa). The head (the
    deformable conv, which has no bf16 kernel, and the ODE) stays fp32, so the features
    are cast back here and the artifact's inputs and outputs stay fp32.
    """

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder.to(torch.bfloat16)

    def forward(self, images: Tensor) -> Tensor:
        return self.encoder(images.to(torch.bfloat16)).float()


# -- meta-filter ---------------------------------------------------------------------

class MetaFilter(nn.Module):
    """``(query_features [Q, 640, h, w], prototypes [way, 640, h, w]) -> [Q·way, G·K, h, w]``:
    DMF's meta-filter generator (``dw_gen``) for every pair i = q·way + k (query-major).

    The offset conv over cat(query, prototype) is linear in its input channels, so it
    splits into a query part (once per query) and a prototype part (once per class),
    broadcast-added per pair. The 3×3 deformable conv that follows samples each pair's
    prototype at that pair's offsets, in one of two ways (``weight_first``):

    - sample first: the 3×3 DCN as the model has it, on the prototypes;
    - weight first: bilinear sampling is linear and its points do not depend on the
      channel, so per tap t, Y_t = W[:, :, t]·P (a 1×1 conv of the ``way`` prototypes),
      then sample Y_t at tap t's points (a 1×1 DCN, one offset group per tap, offsets
      shifted by the tap's place) and sum the taps (that DCN's 1×1 weight [I I … I]).
      Exact in real arithmetic; per pair it samples 9·G·K channels instead of 640·9 and
      multiplies a G·K × 9·G·K matrix instead of G·K × 5760, so it pays when
      9·G·K ≤ 640 (the default G = 64, K = 1); its input, the weighted planes of each
      class, grows as 9·G·K.

    The op reads image i % way for pair i, so each class's planes serve all its queries
    without a copy per pair (the ONNX translations expand them for their backends).
    """

    weight_first: Final[bool]
    filter_channels: Final[int]
    taps: Final[int] = TAPS

    def __init__(self, generator: nn.Module):
        super().__init__()
        with torch.no_grad():
            offset_weight = generator.off_conv.weight.detach()
            self.offset_query_weight = nn.Parameter(
                offset_weight[:, :FEATURE_CHANNELS].clone(), requires_grad=False)
            self.offset_prototype_weight = nn.Parameter(
                offset_weight[:, FEATURE_CHANNELS:].clone(), requires_grad=False)
            filter_weight = generator.kernel_conv.weight.detach()  # [G·K, 640, 3, 3]
            self.filter_channels = int(filter_weight.size(0))
            taps = TAPS
            self.weight_first = taps * self.filter_channels <= FEATURE_CHANNELS
            empty = filter_weight.new_empty(0)
            # each way keeps only the weights it reads (the other's stay empty)
            self.filter_weight = nn.Parameter(
                empty.clone() if self.weight_first else filter_weight.clone(), requires_grad=False)
            self.tap_weight = nn.Parameter(empty, requires_grad=False)
            self.tap_select = nn.Parameter(empty.clone(), requires_grad=False)
            self.register_buffer("tap_shift", empty.clone())
            if self.weight_first:
                self.tap_weight = nn.Parameter(  # row t·O + o = W[o, :, i, j], t = 3i + j
                    filter_weight.permute(2, 3, 0, 1).reshape(-1, FEATURE_CHANNELS, 1, 1).clone(),
                    requires_grad=False)
                self.tap_select = nn.Parameter(  # [I I … I]: output o sums channel o of every tap
                    torch.eye(self.filter_channels, dtype=filter_weight.dtype,
                              device=filter_weight.device).repeat(1, taps)
                    .view(self.filter_channels, -1, 1, 1), requires_grad=False)
                # tap (i, j) of the 3×3, pad-1 DCN samples at (y + i − 1 + dy, x + j − 1 + dx)
                shift = [float(d) for i in range(3) for j in range(3) for d in (i - 1, j - 1)]
                self.tap_shift = torch.tensor(
                    shift, dtype=filter_weight.dtype, device=filter_weight.device).view(1, -1, 1, 1)
        self.offset_padding = int(generator.off_conv.padding[0])

    def forward(self, query_features: Tensor, prototypes: Tensor) -> Tensor:
        # offsets[q, k] = query part[q] + prototype part[k]
        query_offsets = F.conv2d(query_features, self.offset_query_weight,
                                 padding=self.offset_padding)
        prototype_offsets = F.conv2d(prototypes, self.offset_prototype_weight,
                                     padding=self.offset_padding)
        offsets = (query_offsets.unsqueeze(1) + prototype_offsets.unsqueeze(0)).flatten(0, 1)
        if self.weight_first:
            tap_planes = F.conv2d(prototypes, self.tap_weight)  # [way, 9·O, h, w]
            # one offset group per tap; the 1×1 weight [I I … I] sums the taps in its GEMM
            return torch.ops.dmf.deform_conv2d(
                tap_planes, offsets + self.tap_shift, self.tap_select, [1, 1], [0, 0], [1, 1],
                1, self.taps).sigmoid_()
        return torch.ops.dmf.deform_conv2d(
            prototypes, offsets, self.filter_weight, [1, 1], [1, 1], [1, 1], 1, 1).sigmoid_()


# -- head ----------------------------------------------------------------------------

class EpisodeHead(nn.Module):
    """``(support_features, support_labels, query_features) -> scores [Q, way]``:
    prototypes, the meta-filter of every (query, class) pair (``MetaFilter``), the
    alignment ODE (``solvers.Alignment``), the score."""

    groups: Final[int]
    kernel: Final[int]
    channels: Final[int] = FEATURE_CHANNELS
    norm_eps: Final[float] = NORM_EPS

    def __init__(self, model: nn.Module, solver: str = "rk4", steps: int = 1):
        super().__init__()
        self.groups = int(model.groups)
        self.kernel = int(model.kernel)
        self.meta_filter = MetaFilter(model.dw_gen)
        self.align = Alignment(self.groups, self.kernel, solver, steps)

    def forward(self, support_features: Tensor, support_labels: Tensor,
                query_features: Tensor) -> Tensor:
        if (support_features.dim() != 4 or query_features.dim() != 4
                or support_features.size(1) != self.channels
                or query_features.size(1) != self.channels):
            raise ValueError("support_features and query_features must be [N, 640, h, w]")
        if (support_features.size(2) != query_features.size(2)
                or support_features.size(3) != query_features.size(3)):
            raise ValueError("support_features and query_features differ in spatial size")
        if support_labels.dim() != 2 or support_labels.size(0) != support_features.size(0):
            raise ValueError("support_labels must be one-hot [S, way] with one row per support")
        queries = query_features.size(0)
        channels = query_features.size(1)
        height = query_features.size(2)
        width = query_features.size(3)
        labels = support_labels.to(support_features.dtype)
        way = labels.size(1)

        shots_per_class = labels.sum(0).unsqueeze(1)
        prototypes = (labels.t() @ support_features.flatten(1)) / shots_per_class
        prototypes = prototypes.view(way, channels, height, width)

        meta_filter = self.meta_filter(query_features, prototypes)

        # score[q, k] = Σ_{ch,p} x1[q,k,ch,p] · mean_p(P̂[k,ch,p]) / ((h+2)(w+2)).
        # Quirk: the original's padded 1×1 conv + spatial mean counts the zero border.
        class_weights = F.normalize(prototypes, p=2.0, dim=1, eps=self.norm_eps).mean(dim=(2, 3))
        border_area = (height + 2) * (width + 2)
        if self.align.closed_form:
            excess = self.align.growth_excess(meta_filter, queries, way)
            return self._closed_form_scores(query_features, excess, class_weights) / border_area

        # x(0) = query, broadcast over the classes rather than copied per pair
        query_state = query_features.view(queries, 1, self.groups, channels // self.groups,
                                          height, width)
        aligned = self.align(query_state, self.align.filter_taps(meta_filter, queries, way))
        aligned_sums = aligned.sum(dim=(4, 5)).flatten(2)  # [Q, way, 640]
        return (aligned_sums * class_weights).sum(-1) / border_area

    def _closed_form_scores(self, query_features: Tensor, excess: Tensor,
                            class_weights: Tensor) -> Tensor:
        """Σ_{ch,p} x1·w for kernel 1, without the [Q·way, 640, h·w] ODE state.

        With x1 = x + relu(x)·excess (``Alignment.growth_excess``), the score is Σ x·w
        (a matmul) plus Σ_{g,p} excess[q,k,g,p] · Σ_r relu(x)[q,g,r,p]·w[k,g,r].
        """
        queries = query_features.size(0)
        way = class_weights.size(0)
        per_group = self.channels // self.groups
        plain = query_features.sum(dim=(2, 3)) @ class_weights.t()  # [Q, way]
        positive = torch.relu(query_features).flatten(2).view(queries, self.groups, per_group, -1)
        weights = class_weights.view(way, self.groups, per_group).permute(1, 2, 0)  # [G, R, way]
        # [Q, G, p, R] @ [G, R, way] → [Q, G, p, way]: Σ_r relu(x)·w per group and position
        # (the transpose of the last two axes is a transposed-operand flag to the matmul)
        gathered = torch.matmul(positive.transpose(2, 3), weights).flatten(1, 2)  # [Q, G·p, way]
        # [Q, way, G·p] @ [Q, G·p, way] → [Q, way, way], whose diagonal is Σ_{g,p} excess·gathered:
        # way× the products needed (few), and neither operand copied into another layout.
        crossed = torch.matmul(excess.flatten(2), gathered)
        # the diagonal through a mask: torch.diagonal exports as ONNX EyeLike, which TensorRT's
        # parser refuses on a dynamic `way`; Range and Equal it takes
        index = torch.arange(way, device=crossed.device)
        diagonal = (index.unsqueeze(1) == index.unsqueeze(0)).to(crossed.dtype)
        return plain + (crossed * diagonal).sum(-1)


# -- episode -------------------------------------------------------------------------

class EpisodeGraph(nn.Module):
    """``(support [S,3,H,W], support_labels [S,way], query [Q,3,H,W]) -> scores [Q, way]``.

    ``.encoder`` and ``.head`` are the two halves of the split graph.
    """

    def __init__(self, encoder: Encoder, head: EpisodeHead):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, support: Tensor, support_labels: Tensor, query: Tensor) -> Tensor:
        if support.dim() != 4 or query.dim() != 4:
            raise ValueError("support and query must be [N, 3, H, W] images")
        if support.shape[1:] != query.shape[1:]:
            raise ValueError("support and query images differ in size")
        if support_labels.dim() != 2 or support_labels.size(0) != support.size(0):
            raise ValueError("support_labels must be one-hot [S, way] with one row per support image")
        shots = support.size(0)
        features = self.encoder(torch.cat([support, query], 0))
        return self.head(features[:shots], support_labels, features[shots:])


def build_episode_graph(model: nn.Module, solver: str = "rk4", steps: int = 1,
                        cpu_batch: int = 0) -> EpisodeGraph:
    """The deployment graph of an eager DMF model (``dmf_export.models.DMF``), in eval mode.

    ``solver``/``steps``: the fixed-step method and number of steps on [0, 1]; the
    defaults (rk4, 1 step) are the original. ``cpu_batch``: images the encoder takes at a
    time on a CPU (0: all; see ``Encoder``). Weights keep the model's dtype and device.
    """
    tableau(solver)
    check_steps(steps)
    for name in ("groups", "kernel", "base", "dw_gen"):
        if not hasattr(model, name):
            raise DMFExportError(f"not a DMF model: it has no '{name}' (got {type(model).__name__})")
    graph = EpisodeGraph(Encoder(model.base, cpu_batch), EpisodeHead(model, solver, steps))
    return graph.eval().requires_grad_(False)


def build_split_graphs(model: nn.Module, solver: str = "rk4",
                       steps: int = 1) -> Tuple[Encoder, EpisodeHead]:
    """(encoder, head) of ``build_episode_graph``: features once, scores many times."""
    graph = build_episode_graph(model, solver, steps)
    return graph.encoder, graph.head

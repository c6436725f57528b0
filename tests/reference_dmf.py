"""An independent, functional float64 rendering of DMF's eval forward (docs/op.md, "DMF eval forward").

Written from docs/op.md alone; shares no code with models/ or dmf_export/ (the DCN comes
from reference_dcn.py, itself independent). Deliberately literal rather than fast:
explicit pair loop, a hand-written 3/8-rule RK4 step, the alignment A from its index
formula, and the score's (h+2)(w+2) divisor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from reference_dcn import deform_conv2d_reference

EPS_BN = 1e-5
SLOPE = 0.1


def _bn(x, sd, prefix):
    return F.batch_norm(x, sd[prefix + "running_mean"], sd[prefix + "running_var"],
                        sd[prefix + "weight"], sd[prefix + "bias"], training=False, eps=EPS_BN)


def backbone(sd, images):
    x = images
    for layer in range(1, 5):
        p = f"base.layer{layer}.0."
        out = F.conv2d(x, sd[p + "conv1.weight"], padding=1)
        out = F.leaky_relu(_bn(out, sd, p + "bn1."), SLOPE)
        out = F.conv2d(out, sd[p + "conv2.weight"], padding=1)
        out = F.leaky_relu(_bn(out, sd, p + "bn2."), SLOPE)
        out = _bn(F.conv2d(out, sd[p + "conv3.weight"], padding=1), sd, p + "bn3.")
        shortcut = _bn(F.conv2d(x, sd[p + "downsample.0.weight"]), sd, p + "downsample.1.")
        x = F.leaky_relu(out + shortcut, SLOPE)
        if layer < 4:
            x = F.max_pool2d(x, 2, 2, ceil_mode=True)
    return x


def alignment_A(x, phi_raw, groups, kernel):
    """A(x, F)[g·R + r, p] = Σ_k U[g, p, r, k] · Φ[g, p, k], for one pair (x: [c, h, w])."""
    c, h, w = x.shape
    R = c // groups
    K = kernel * kernel
    pad = 1 if kernel == 3 else 0
    xp = F.pad(x, (pad, pad, pad, pad))
    # U[g, p, r, k] = x[g·R + r, neighbour k of p], k row-major over the window
    taps = []
    for k in range(K):
        dy, dx = divmod(k, kernel)
        taps.append(xp[:, dy:dy + h, dx:dx + w].reshape(groups, R, h * w))  # [g, r, p]
    U = torch.stack(taps, dim=-1).permute(0, 2, 1, 3)  # [g, p, r, k]
    # Φ: F [G·K, h, w] read in row-major memory order as [G, h·w, K]
    Phi = phi_raw.reshape(-1).reshape(groups, h * w, K)
    A = torch.einsum("gprk,gpk->grp", U, Phi)
    return A.reshape(c, h, w)


def rk4_38(f, x):
    """torchdiffeq's 'rk4' over the grid [0, 1]: one 3/8-rule step, dt = 1."""
    third = 1.0 / 3.0
    k1 = f(x)
    k2 = f(x + k1 * third)
    k3 = f(x + (k2 - k1 * third))
    k4 = f(x + (k1 - k2 + k3))
    return x + (k1 + 3 * (k2 + k3) + k4) * 0.125


def as_float64(sd):
    return {k: (v.double() if v.is_floating_point() else v) for k, v in sd.items()}


def dmf_reference(sd, support, support_labels, query, groups, kernel, details=False):
    """scores [Q, way] in float64; with ``details`` also a dict of intermediates."""
    sd = as_float64(sd)
    f = backbone(sd, torch.cat([support, query]).double())
    S = support.shape[0]
    return head(sd, f[:S], support_labels, f[S:], groups, kernel, details)


def head(sd, fs, support_labels, fq, groups, kernel, details=False):
    """scores [Q, way] from float64 backbone features (``sd`` from ``as_float64``)."""
    y = support_labels.double()
    S, way, Q = fs.shape[0], y.shape[1], fq.shape[0]
    c, h, w = fs.shape[1:]
    prototypes = (y.t() @ fs.reshape(S, -1)) / y.sum(0)[:, None]
    prototypes = prototypes.reshape(way, c, h, w)

    support_pairs, query_pairs = [], []
    for q in range(Q):          # pair i = q·way + k
        for k in range(way):
            support_pairs.append(prototypes[k])
            query_pairs.append(fq[q])
    S_pairs = torch.stack(support_pairs)
    Q_pairs = torch.stack(query_pairs)

    offsets = F.conv2d(torch.cat([Q_pairs, S_pairs], 1), sd["dw_gen.off_conv.weight"], padding=2)
    filters = torch.sigmoid(deform_conv2d_reference(
        S_pairs, offsets, sd["dw_gen.kernel_conv.weight"], stride=1, padding=1, dilation=1))

    scores = torch.empty(Q * way, dtype=torch.float64)
    aligned_all = []
    for i in range(Q * way):
        x1 = rk4_38(lambda x: torch.relu(alignment_A(x, filters[i], groups, kernel)), Q_pairs[i])
        aligned_all.append(x1)
        s = S_pairs[i]
        norm = s.pow(2).sum(0, keepdim=True).sqrt().clamp_min(1e-12)
        weights = (s / norm).mean(dim=(1, 2))
        scores[i] = (x1 * weights[:, None, None]).sum() / ((h + 2) * (w + 2))
    scores = scores.reshape(Q, way)
    if not details:
        return scores
    return scores, {"features": torch.cat([fs, fq]), "prototypes": prototypes,
                    "offsets": offsets, "filters": filters, "aligned": torch.stack(aligned_all)}

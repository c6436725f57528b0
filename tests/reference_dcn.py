"""An independent, plain-PyTorch DCNv1 forward, written from docs/op.md ("Semantics").

It shares no code with csrc/ or dmf_export/: the op's tests and the model's reference
use it as ground truth. Vectorised with gathers, so it runs in float64 too.
"""
from __future__ import annotations

import torch


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def deform_conv2d_reference(input, offset, weight, stride=1, padding=0, dilation=1,
                            groups=1, offset_groups=1):
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    n, c, h, w = input.shape
    out_channels, cg, kh, kw = weight.shape
    taps = kh * kw
    ho = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    wo = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    assert cg * groups == c and offset.shape == (n, 2 * offset_groups * taps, ho, wo)

    dtype, device = input.dtype, input.device
    off = offset.reshape(n, offset_groups, taps, 2, ho, wo)
    tap_y = (torch.arange(kh, device=device) * dh).repeat_interleave(kw)  # row-major taps
    tap_x = (torch.arange(kw, device=device) * dw).repeat(kh)
    out_y = torch.arange(ho, device=device) * sh - ph
    out_x = torch.arange(wo, device=device) * sw - pw
    py = (out_y[None, :, None] + tap_y[:, None, None]).to(dtype) + off[:, :, :, 0]
    px = (out_x[None, None, :] + tap_x[:, None, None]).to(dtype) + off[:, :, :, 1]
    # [n, og, taps, ho, wo]; comparisons with NaN are False, so NaN samples are 0
    valid = (py > -1) & (px > -1) & (py < h) & (px < w)
    py = torch.where(valid, py, torch.zeros_like(py))
    px = torch.where(valid, px, torch.zeros_like(px))
    y0, x0 = torch.floor(py), torch.floor(px)
    ly, lx = py - y0, px - x0
    y0, x0 = y0.long(), x0.long()

    planes = input.reshape(n, offset_groups, c // offset_groups, h * w)
    sampled = torch.zeros(n, offset_groups, c // offset_groups, taps * ho * wo,
                          dtype=dtype, device=device)
    for cy, cx, wy, wx in ((0, 0, 1 - ly, 1 - lx), (0, 1, 1 - ly, lx),
                           (1, 0, ly, 1 - lx), (1, 1, ly, lx)):
        yy, xx = y0 + cy, x0 + cx
        inside = valid & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        index = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).reshape(n, offset_groups, 1, -1)
        corner = torch.gather(planes, 3, index.expand(-1, -1, c // offset_groups, -1))
        # a corner outside the image is 0 whatever the clamped pixel it read holds
        # (selected, not weighted by 0: 0 * Inf is NaN)
        inside = inside.reshape(n, offset_groups, 1, -1)
        term = corner * (wy * wx).reshape(n, offset_groups, 1, -1)
        sampled += torch.where(inside, term, torch.zeros_like(term))

    columns = sampled.reshape(n, groups, cg * taps, ho * wo)  # channel-major, then tap
    kernel = weight.reshape(groups, out_channels // groups, cg * taps)
    out = torch.einsum("gok,ngkl->ngol", kernel, columns)
    return out.reshape(n, out_channels, ho, wo)

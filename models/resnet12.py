"""ResNet-12 backbone of DMF (640×11×11 features from 3×84×84 images), eval semantics.

Module names follow the original training code, so ``state_dict()`` keys are exactly
the released checkpoints' ``base.layer{n}.0.*`` entries.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WIDTHS = (64, 160, 320, 640)
LEAKY_SLOPE = 0.1


def _batch_norm_eval(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    # Always the running statistics, whatever .train() says: the model is a deployment
    # reference, and BN in training mode would also update the buffers.
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                        training=False, momentum=0.0, eps=bn.eps)


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv-BN-LReLU ×2, conv-BN, plus a 1×1 conv-BN shortcut; LReLU; optional 2×2 max-pool."""

    def __init__(self, in_channels: int, channels: int, pool: bool = True):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, channels)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = _conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = _conv3x3(channels, channels)
        self.bn3 = nn.BatchNorm2d(channels)
        self.downsample = nn.Sequential(
            nn.Conv2d(in_channels, channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.pool = pool
        # The original increments this on every forward (DropBlock schedule); it is kept
        # only so checkpoints load strictly, and never touched here.
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(_batch_norm_eval(self.bn1, self.conv1(x)), LEAKY_SLOPE)
        out = F.leaky_relu(_batch_norm_eval(self.bn2, self.conv2(out)), LEAKY_SLOPE)
        out = _batch_norm_eval(self.bn3, self.conv3(out))
        shortcut = _batch_norm_eval(self.downsample[1], self.downsample[0](x))
        out = F.leaky_relu(out + shortcut, LEAKY_SLOPE)
        if self.pool:
            # ceil_mode: 21 → 11 in the third block
            out = F.max_pool2d(out, kernel_size=2, stride=2, ceil_mode=True)
        # Dropout / DropBlock are identity in eval.
        return out


class ResNet12(nn.Module):
    """Four blocks 64-160-320-640; the fourth does not pool (84 → 42 → 21 → 11 → 11)."""

    out_channels = WIDTHS[-1]

    def __init__(self):
        super().__init__()
        in_channels = 3
        for index, width in enumerate(WIDTHS, start=1):
            block = BasicBlock(in_channels, width, pool=index < len(WIDTHS))
            self.add_module(f"layer{index}", nn.Sequential(block))
            in_channels = width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.layer1(images)
        features = self.layer2(features)
        features = self.layer3(features)
        return self.layer4(features)

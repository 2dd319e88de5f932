"""PyTorch reference networks (plain torch.nn, NCHW) with the official BANA state-dict keys.

Written from the layer descriptions in docs/method.md, independently of our Flax code, as the
numerics reference for the parity tests and `bana compare-torch`. Needs torch (the `torch` extra).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VGG16_WIDTHS = (64, 128, 256, 512, 512)


class VGGRef(nn.Module):
    def __init__(self, dilation, widths=VGG16_WIDTHS, fc_dim=1024):
        super().__init__()
        plan = [(1, 2), (2, 2), (3, 3), (4, 3), (5, 3)]
        in_ch = 3
        for (block, n), width in zip(plan, widths):
            for i in range(1, n + 1):
                d = 2 if block == 5 else 1
                setattr(self, f"conv{block}_{i}", nn.Conv2d(in_ch, width, 3, 1, padding=d, dilation=d))
                in_ch = width
        self.plan = plan
        self.fc6 = nn.Conv2d(in_ch, fc_dim, 3, 1, padding=dilation, dilation=dilation)
        self.dropout1 = nn.Dropout2d(0.5)
        self.fc7 = nn.Conv2d(fc_dim, fc_dim, 1)
        self.dropout2 = nn.Dropout2d(0.5)

    def forward(self, x, return_stages=False):
        stages = {}
        for block, n in self.plan:
            for i in range(1, n + 1):
                x = F.relu(getattr(self, f"conv{block}_{i}")(x))
            x = F.max_pool2d(x, 3, 2 if block <= 3 else 1, 1)
            stages[f"pool{block}"] = x
        x = F.avg_pool2d(x, 3, 1, 1)
        x = self.dropout1(F.relu(self.fc6(x)))
        stages["fc6"] = x
        x = self.dropout2(F.relu(self.fc7(x)))
        stages["fc7"] = x
        return stages if return_stages else x


class LabelerRef(nn.Module):
    def __init__(self, num_classes, widths=VGG16_WIDTHS, fc_dim=1024, dilation=1):
        super().__init__()
        self.backbone = VGGRef(dilation, widths, fc_dim)
        self.classifier = nn.Conv2d(fc_dim, num_classes, 1, bias=False)

    def forward(self, x):
        return self.backbone(x)


class DeepLabV1Ref(LabelerRef):
    def __init__(self, num_classes, widths=VGG16_WIDTHS, fc_dim=1024):
        super().__init__(num_classes, widths, fc_dim, dilation=12)


class ConvBnRef(nn.Sequential):
    def __init__(self, cin, cout, k, s, p, d, relu, momentum):
        super().__init__()
        self.add_module("conv", nn.Conv2d(cin, cout, k, s, p, d, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout, eps=1e-5, momentum=momentum))
        if relu:
            self.add_module("relu", nn.ReLU())


class BottleneckRef(nn.Module):
    def __init__(self, cin, cout, stride, dilation, project, momentum):
        super().__init__()
        mid = cout // 4
        self.reduce = ConvBnRef(cin, mid, 1, stride, 0, 1, True, momentum)
        self.conv3x3 = ConvBnRef(mid, mid, 3, 1, dilation, dilation, True, momentum)
        self.increase = ConvBnRef(mid, cout, 1, 1, 0, 1, False, momentum)
        self.shortcut = ConvBnRef(cin, cout, 1, stride, 0, 1, False, momentum) if project else None

    def forward(self, x):
        skip = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.increase(self.conv3x3(self.reduce(x))) + skip)


class ResNetRef(nn.Module):
    def __init__(self, n_blocks=(3, 4, 23, 3), base=64, momentum=0.999):
        super().__init__()
        ch = [base * 2**p for p in range(6)]
        self.layer1 = nn.Sequential()
        self.layer1.add_module("conv1", ConvBnRef(3, ch[0], 7, 2, 3, 1, True, momentum))
        self.layer1.add_module("pool", nn.MaxPool2d(3, 2, 1, ceil_mode=True))
        specs = [(ch[0], ch[2], 1, 1), (ch[2], ch[3], 2, 1), (ch[3], ch[4], 1, 2), (ch[4], ch[5], 1, 4)]
        for li, (n, (cin, cout, stride, dil)) in enumerate(zip(n_blocks, specs), start=2):
            layer = nn.Sequential()
            for b in range(n):
                layer.add_module(f"block{b + 1}", BottleneckRef(
                    cin if b == 0 else cout, cout, stride if b == 0 else 1, dil, b == 0, momentum))
            setattr(self, f"layer{li}", layer)

    def forward(self, x, return_stages=False):
        stages = {}
        for i in range(1, 6):
            x = getattr(self, f"layer{i}")(x)
            stages[f"layer{i}"] = x
        return stages if return_stages else x


class DeepLabV2Ref(nn.Module):
    def __init__(self, num_classes, n_blocks=(3, 4, 23, 3), base=64, aspp_dim=256, momentum=0.999):
        super().__init__()
        self.backbone = ResNetRef(n_blocks, base, momentum)
        for i, rate in enumerate((6, 12, 18, 24), start=1):
            setattr(self, f"c{i}", nn.Conv2d(base * 32, aspp_dim, 3, 1, padding=rate, dilation=rate, bias=False))
        self.classifier = nn.Conv2d(aspp_dim, num_classes, 1, bias=False)

    def forward(self, x):
        x = self.backbone(x)
        return F.relu(self.c1(x) + self.c2(x) + self.c3(x) + self.c4(x))



# EfficientNet-Lite0 (lukemelas-style keys `_conv_stem`, `_bn0`, `_blocks.N.*`, `_conv_head`, `_bn1`,
# `_fc`), from the block table: repeats, kernel, stride, expand ratio, output channels.
LITE0_TABLE = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
               (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]


def same_pads(size, k, s, d):
    """TF "SAME": total padding for output ceil(size / s), the odd pixel at the end."""
    out = -(-size // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Conv without bias and TF "SAME" padding, either recomputed from each input ('dynamic', TF's
    rule) or fixed at construction from `image_size` ('static', the PyTorch port's rule)."""

    def __init__(self, cin, cout, k, s=1, d=1, groups=1, padding="dynamic", image_size=None):
        super().__init__(cin, cout, k, s, 0, d, groups, bias=False)
        self.mode = padding
        if padding == "static":
            ph, pw = same_pads(image_size[0], k, s, d), same_pads(image_size[1], k, s, d)
            self.static_pads = [pw[0], pw[1], ph[0], ph[1]]

    def forward(self, x):
        if self.mode == "static":
            pads = self.static_pads
        else:
            k, s, d = self.kernel_size[0], self.stride[0], self.dilation[0]
            ph, pw = same_pads(x.shape[2], k, s, d), same_pads(x.shape[3], k, s, d)
            pads = [pw[0], pw[1], ph[0], ph[1]]
        return super().forward(F.pad(x, pads))


class MBConvRef(nn.Module):
    def __init__(self, cin, cout, expand, k, s, d, conv):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = conv(cin, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=1e-3, momentum=0.01)
        self._depthwise_conv = conv(mid, mid, k, s, d, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3, momentum=0.01)
        self._project_conv = conv(mid, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)
        self.expand, self.skip = expand, s == 1 and cin == cout

    def forward(self, x):
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand != 1 else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0Ref(nn.Module):
    """EfficientNet-Lite0 on RGB `(x / 255 - 0.498) / 0.502` input, NCHW.

    output_stride 8/16: the stage that would stride past it runs at stride 1; its first block keeps
    the dilation so far, the rest use twice it. padding 'static' fixes every pad from
    `image_size` (224) at construction like the PyTorch port; 'dynamic' follows TF per input.
    `forward` -> last block (320 ch) or, with `head`, the ReLU6 head (1280 ch); `logits` -> `_fc`.
    """

    def __init__(self, output_stride=32, padding="dynamic", image_size=224, head=True):
        super().__init__()
        size = [image_size, image_size]

        def conv(cin, cout, k, s=1, d=1, groups=1):
            return SameConv2d(cin, cout, k, s, d, groups, padding, size)

        self._conv_stem = conv(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3, momentum=0.01)
        size = [-(-v // 2) for v in size]
        blocks, cin, stride, dilation = [], 32, 2, 1
        for repeats, k, s, expand, cout in LITE0_TABLE:
            first_dilation = dilation
            if stride * s > output_stride:
                s, dilation = 1, dilation * s
            else:
                stride *= s
            for i in range(repeats):
                blocks.append(MBConvRef(cin, cout, expand, k, s if i == 0 else 1,
                                        first_dilation if i == 0 else dilation, conv))
                size = [-(-v // (s if i == 0 else 1)) for v in size]
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = conv(320, 1280, 1)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3, momentum=0.01)
        self._fc = nn.Linear(1280, 1000)
        self.head = head

    def forward(self, x, return_stages=False):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        stages = {"stem": x}
        for i, block in enumerate(self._blocks):
            x = block(x)
            stages[f"block{i}"] = x
        if self.head:
            x = F.relu6(self._bn1(self._conv_head(x)))
            stages["head"] = x
        return stages if return_stages else x

    def logits(self, x):
        """ImageNet logits `(B, 1000)` (needs `head`): global average pool, then `_fc`."""
        return self._fc(self.forward(x).mean(dim=(2, 3)))

def dot_scores(features, classifier):
    return F.conv2d(features, classifier.weight)


def cosine_scores(features, classifier):
    return F.conv2d(F.normalize(features, dim=1), F.normalize(classifier.weight, dim=1))


def randomise_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights with O(1) activations, and random BatchNorm statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return model

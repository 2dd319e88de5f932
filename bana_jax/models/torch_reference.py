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

"""PyTorch reference networks (plain torch.nn, NCHW) with the official BANA state-dict keys.

Written from the paper's and the official code's layer descriptions, independently of our Flax code,
as the numerics reference for the parity tests and `bana compare-torch`. Needs torch (the `torch` extra).

`LabelerRef.forward_boxes` is the stage-1 forward with boxes as the official code runs it (grid
background prototypes, background attention, each box's ROI resampled with `F.grid_sample` at its
own size and pooled in 2 x 2 windows, GAP fallback, classifier, cross-entropy), one image and one
box at a time: slow, but a direct transcription to check `bana_jax.bap` against.
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

    def forward_boxes(self, images, boxes, batch_of_box, box_labels, bg_mask, **options):
        """Stage 1 on a batch with boxes (official `Labeler.forward` + the training script's loss).

        Args:
          images: `(B, 3, H, W)` Caffe-normalised crops.
          boxes: `(K, 4)` normalised `[x_min, y_min, x_max, y_max]` (`x / ((W - 1) / 2) - 1`),
            real boxes only; batch_of_box `(K,)` int: the image of each box; box_labels `(K,)`.
          bg_mask: `(B, H, W)` float, 1 = background, at crop resolution.
          options: keywords of `stage1_vectors_ref` (grid_size, pooling, gap_fallback_bg_fraction,
            roi_output).
        Returns:
          the dict of `stage1_vectors_ref` plus features `(B, D, h, w)`, logits
          `(K * O_h * O_w + M, C)` (foreground vectors box by box, then background vectors),
          targets `(K * O_h * O_w + M,)` and loss (mean cross-entropy).
        """
        features = self.backbone(images)
        out = stage1_vectors_ref(features, bg_mask, boxes, batch_of_box, **options)
        vectors = torch.cat([out["fg_vectors"].flatten(0, 1), out["bg_vectors"]])
        # The classifier is the 1x1 conv, applied to vectors as 1 x 1 maps.
        logits = self.classifier(vectors[:, :, None, None]).flatten(1)
        windows = out["fg_vectors"].shape[1]
        targets = torch.cat([box_labels.long().repeat_interleave(windows),
                             torch.zeros(len(out["bg_vectors"]), dtype=torch.long,
                                         device=logits.device)])
        loss = F.cross_entropy(logits, targets)
        return {**out, "features": features, "logits": logits, "targets": targets, "loss": loss}


class DeepLabV1Ref(LabelerRef):
    def __init__(self, num_classes, widths=VGG16_WIDTHS, fc_dim=1024):
        super().__init__(num_classes, widths, fc_dim, dilation=12)


# ----------------------------------------------------------------------------------------------
# Stage 1 with boxes (supplement and official-code details), one image and box at a time
# ----------------------------------------------------------------------------------------------

POOL_EPS = 1e-12  # added to every weighted-average denominator, as in the official code


def grid_pads(size, grid_size):
    """(before, after) zero padding to a multiple of N: an even pad is split, an odd one goes after."""
    pad = (-size) % grid_size
    return (pad // 2, pad // 2) if pad % 2 == 0 else (0, pad)


def grid_background_ref(features, small_mask, grid_size):
    """Mean background feature of each N x N cell of the zero-padded map.

    features `(B, D, h, w)`, small_mask `(B, 1, h, w)` -> prototypes `(B, N * N, D)` (cells
    row-major) and valid `(B, N * N)` bool (the cell holds a background pixel).
    """
    (top, bottom), (left, right) = (grid_pads(features.shape[2], grid_size),
                                    grid_pads(features.shape[3], grid_size))
    feats = F.pad(features, (left, right, top, bottom))
    mask = F.pad(small_mask, (left, right, top, bottom))
    cell = (feats.shape[2] // grid_size, feats.shape[3] // grid_size)
    # Sums over each cell: an average pool whose divisor is 1.
    numer = F.avg_pool2d(feats * mask, cell, cell, divisor_override=1)
    denom = F.avg_pool2d(mask, cell, cell, divisor_override=1)
    prototypes = numer / (denom + POOL_EPS)
    return prototypes.flatten(2).transpose(1, 2), denom.flatten(1) > 0


def roi_extent_ref(lo, hi, size):
    """ROI length in feature pixels along one axis: `ceil(hi_f) - floor(lo_f)`.

    lo, hi: 0-d float32 tensors (normalised); `x_f = x_n * (size - 1) / 2 + (size - 1) / 2` in
    float32 like the official code, whose integer result depends on that rounding.
    """
    norm = (size - 1) / 2
    ends = torch.stack([lo, hi]) * norm + norm
    return int(ends[1].ceil() - ends[0].floor())


def roi_grid_ref(box, roi_h, roi_w):
    """Official `gen_grid`: the `(1, roi_h, roi_w, 2)` grid (x, y) at linspace over the box."""
    x_min, y_min, x_max, y_max = box
    grid_x = torch.linspace(x_min, x_max, roi_w, device=box.device)
    grid_y = torch.linspace(y_min, y_max, roi_h, device=box.device)
    grid_x = grid_x.view(1, 1, roi_w, 1).expand(1, roi_h, roi_w, 1)
    grid_y = grid_y.view(1, roi_h, 1, 1).expand(1, roi_h, roi_w, 1)
    return torch.cat([grid_x, grid_y], dim=-1)


def background_attention_ref(roi, prototypes):
    """`A(p) = mean_j ReLU(cos(f(p), q_j))`: roi `(1, D, H, W)`, prototypes `(M, D)` (valid
    cells only, M >= 1) -> `(1, 1, H, W)`."""
    normed_roi = F.normalize(roi, dim=1)
    normed_q = F.normalize(prototypes, dim=1)[:, :, None, None]
    cos = (normed_roi * normed_q).sum(dim=1, keepdim=True)  # (M, 1, H, W)
    return F.relu(cos).mean(dim=0, keepdim=True)


def weighted_window_pool_ref(roi, weight, out=(2, 2)):
    """Official `weighted_avg_pool_2d`: `sum w f / (sum w + eps)` over O_h x O_w windows.

    roi `(1, D, H, W)`, weight `(1, 1, H, W)` -> `(O_h * O_w, D)`, windows row-major. Stride
    `H // O`, kernel `H - (O - 1) * stride` (windows overlap when H is odd); an ROI smaller than the
    layout is replicate-padded (rows at the bottom, columns on the left) and pooled per pixel.
    """
    out_h, out_w = out
    filtered = roi * weight
    _, dims, h, w = filtered.shape
    stride_h, stride_w = h // out_h, w // out_w
    if stride_h == 0:
        stride_h = 1
        filtered = F.pad(filtered, (0, 0, 0, out_h - h), mode="replicate")
        weight = F.pad(weight, (0, 0, 0, out_h - h), mode="replicate")
    if stride_w == 0:
        stride_w = 1
        filtered = F.pad(filtered, (out_w - w, 0, 0, 0), mode="replicate")
        weight = F.pad(weight, (out_w - w, 0, 0, 0), mode="replicate")
    # Kernel from the unpadded size; at least 1 for a padded (1-pixel) ROI.
    kernel_h = max(h - (out_h - 1) * stride_h, 1)
    kernel_w = max(w - (out_w - 1) * stride_w, 1)
    ones = torch.ones(dims, 1, kernel_h, kernel_w, dtype=roi.dtype, device=roi.device)
    numer = F.conv2d(filtered, ones, stride=(stride_h, stride_w), groups=dims)
    denom = F.conv2d(weight, ones[:1], stride=(stride_h, stride_w)) + POOL_EPS
    return (numer / denom).flatten(2)[0].T


def stage1_vectors_ref(features, bg_mask, boxes, batch_of_box, *, grid_size=4, pooling="bap",
                       gap_fallback_bg_fraction=0.125, roi_output=(2, 2)):
    """Foreground vectors of every box and background vectors of every valid grid cell.

    Args:
      features: `(B, D, h, w)`; bg_mask `(B, H, W)` at crop resolution, 1 = background.
      boxes: `(K, 4)` normalised; batch_of_box `(K,)` int.
      pooling: 'bap', or 'gap' (weight 1 everywhere); an image whose background is at most
        `gap_fallback_bg_fraction` of the crop, or that has no valid cell, uses GAP under 'bap' too.
    Returns:
      dict: fg_vectors `(K, O_h * O_w, D)`, bg_vectors `(M, D)` (valid cells, image by image, cells
      row-major), bg_cells `[(b, j)] * M`, use_bap `[bool] * B`, roi_sizes `[(H_roi, W_roi)] * K`.
    """
    h, w = features.shape[2:]
    # mode='nearest' is PyTorch's legacy rule src = floor(dst * in / out).
    small_mask = F.interpolate(bg_mask[:, None], size=(h, w), mode="nearest")
    prototypes, valid = grid_background_ref(features, small_mask, grid_size)
    use_bap = [pooling == "bap" and bool(bg_mask[b].mean() > gap_fallback_bg_fraction)
               and bool(valid[b].any())
               for b in range(features.shape[0])]
    fg_vectors, roi_sizes = [], []
    for box, b in zip(boxes, batch_of_box.tolist()):
        roi_h, roi_w = roi_extent_ref(box[1], box[3], h), roi_extent_ref(box[0], box[2], w)
        roi = F.grid_sample(features[b:b + 1], roi_grid_ref(box, roi_h, roi_w), mode="bilinear",
                            padding_mode="zeros", align_corners=False)
        if use_bap[b]:
            weight = 1 - background_attention_ref(roi, prototypes[b][valid[b]])
        else:
            weight = torch.ones_like(roi[:, :1])
        fg_vectors.append(weighted_window_pool_ref(roi, weight, roi_output))
        roi_sizes.append((roi_h, roi_w))
    return {
        "fg_vectors": torch.stack(fg_vectors),
        "bg_vectors": prototypes[valid],
        "bg_cells": [tuple(cell) for cell in torch.nonzero(valid).tolist()],
        "use_bap": use_bap,
        "roi_sizes": roi_sizes,
    }


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

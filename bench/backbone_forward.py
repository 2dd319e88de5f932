"""Seconds per forward pass of the stage-1 labeler backbones on one image, in eval mode.

    python bench/backbone_forward.py                      # 640 x 480, 5 timed runs
    python bench/backbone_forward.py --size 320 240 --runs 3

Three backbones, same input, median of `--runs` jitted calls after a warm-up:
- `efficientnet_lite0_labeler` (output stride 8) as it is, depthwise convolutions as shifted,
  strided slices (`layers.DepthwiseConv`);
- the same network and weights with the depthwise convolutions as XLA grouped convolutions
  (`feature_group_count = C`), the reference;
- `vgg16_labeler` (the paper's labeler).
Prints each median and its ratio to the grouped-convolution reference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bana_jax import builders  # noqa: E402
from bana_jax.models import layers  # noqa: E402
from bana_jax.config import apply_overrides, base_config  # noqa: E402


def grouped_depthwise(self, x):
    """`layers.DepthwiseConv.__call__` as one grouped convolution (the reference)."""
    k, s, d = self.size, self.stride, self.dilation
    height, width = x.shape[1:3]
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype), (s, s),
        (layers.same_padding(height, k, s, d), layers.same_padding(width, k, s, d)),
        rhs_dilation=(d, d), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1])


def median_seconds(name: str, image: np.ndarray, runs: int) -> float:
    config = apply_overrides(base_config(), [("model.name", name), ("model.num_classes", "21")])
    backbone = builders.build_labeler(config).backbone
    backbone.eval()
    graphdef, state = nnx.split(backbone)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    x = jnp.asarray(image)
    jax.block_until_ready(forward(state, x))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(forward(state, x))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    width, height = args.size
    image = np.random.default_rng(0).normal(size=(1, height, width, 3)).astype(np.float32)
    print(f"{jax.devices()[0].device_kind}, {width} x {height}, median of {args.runs}")
    with mock.patch.object(layers.DepthwiseConv, "__call__", grouped_depthwise):
        reference = median_seconds("efficientnet_lite0_labeler", image, args.runs)
    rows = [("efficientnet_lite0, grouped conv (reference)", reference),
            ("efficientnet_lite0, shifted slices", median_seconds("efficientnet_lite0_labeler", image, args.runs)),
            ("vgg16", median_seconds("vgg16_labeler", image, args.runs))]
    for label, seconds in rows:
        print(f"{label:<46} {seconds:8.3f} s   {reference / seconds:6.2f}x the reference's speed")


if __name__ == "__main__":
    main()

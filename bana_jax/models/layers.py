"""Building blocks with PyTorch semantics, NHWC.

Convolutions use explicit integer padding (PyTorch `padding=p`), pooling follows
`nn.MaxPool2d` / `nn.AvgPool2d` (including `ceil_mode` and `count_include_pad=True`), and
`BatchNorm` keeps PyTorch's running-statistics rule (momentum is the weight of the new batch,
running variance is the unbiased batch variance), so imported checkpoints behave the same.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# torch.nn.init.normal_(std=0.01): the init of every new (from-scratch) layer in the official code.
normal_001 = nnx.initializers.normal(stddev=0.01)
# He/Kaiming normal (fan_in) for backbone convs that are not loaded from a checkpoint.
he_normal = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
# The first conv sees Caffe-normalised pixels (BGR minus mean, 0-255 range: std ~60 on photos), not
# unit-variance inputs: He init scaled down by that std keeps a from-scratch trunk's activations
# near 1 instead of ~60 (with which SGD at the official rates diverges). Pretrained inits overwrite it.
CAFFE_PIXEL_STD = 60.0
he_normal_caffe_input = nnx.initializers.variance_scaling(2.0 / CAFFE_PIXEL_STD**2, "fan_in", "normal")


def conv2d(
    in_ch: int,
    out_ch: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    use_bias: bool = True,
    kernel_init=he_normal,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """`nn.Conv2d(in_ch, out_ch, kernel, stride, padding, dilation, bias=use_bias)` in NHWC.

    Parameters are float32 (kernel HWIO); `dtype` is the compute dtype.
    """
    return nnx.Conv(
        in_ch,
        out_ch,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        kernel_dilation=(dilation, dilation),
        use_bias=use_bias,
        kernel_init=kernel_init,
        bias_init=nnx.initializers.zeros_init(),
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF "SAME" padding `(before, after)` of one axis: output `ceil(size / stride)`, extra pixel after."""
    span = (kernel - 1) * dilation + 1
    total = max((-(-size // stride) - 1) * stride + span - size, 0)
    return total // 2, total - total // 2


class DepthwiseConv(nnx.Module):
    """Bias-free depthwise `k x k` conv with TF "SAME" padding on `(B, H, W, C)`.

    The same parameter as `nnx.Conv(C, C, k, feature_group_count=C)` (`kernel` `(k, k, 1, C)`), but
    computed as a sum of `k * k` shifted, strided slices times per-channel weights: XLA:CPU runs
    grouped convolutions one channel at a time, and this form is one fused elementwise loop on every
    backend (the same sums, in a different order).
    """

    def __init__(self, channels: int, kernel: int, *, stride: int = 1, dilation: int = 1,
                 kernel_init=he_normal, dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = nnx.Param(kernel_init(rngs.params(), (kernel, kernel, 1, channels), jnp.float32))
        self.size, self.stride, self.dilation, self.dtype = kernel, stride, dilation, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        k, s, d = self.size, self.stride, self.dilation
        height, width = x.shape[1:3]
        out_h, out_w = -(-height // s), -(-width // s)
        x = x.astype(self.dtype)
        x = jnp.pad(x, ((0, 0), same_padding(height, k, s, d), same_padding(width, k, s, d), (0, 0)))
        weights = self.kernel[...].astype(self.dtype)
        out = None
        for i in range(k):
            for j in range(k):
                tap = jax.lax.slice(
                    x, (0, i * d, j * d, 0),
                    (x.shape[0], i * d + (out_h - 1) * s + 1, j * d + (out_w - 1) * s + 1, x.shape[3]),
                    (1, s, s, 1)) * weights[i, j, 0]
                out = tap if out is None else out + tap
        return out


def _pool_out_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """Output length of a PyTorch pooling window (torch's pooling_output_shape)."""
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    # PyTorch drops a last window that would start in the right padding.
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _pool_padding(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool):
    out = _pool_out_size(size, kernel, stride, padding, ceil_mode)
    high = (out - 1) * stride + kernel - size - padding
    if high < 0:  # the last input rows are never covered; crop them instead of padding
        raise ValueError(
            f"unsupported pooling geometry: size={size}, kernel={kernel}, stride={stride}, "
            f"padding={padding} leaves {-high} uncovered rows"
        )
    return (padding, high)


def max_pool(x: jax.Array, kernel: int, stride: int, padding: int, *, ceil_mode: bool = False):
    """`nn.MaxPool2d(kernel, stride, padding, ceil_mode=...)` on `(B, H, W, C)`; pads with -inf."""
    pads = (
        (0, 0),
        _pool_padding(x.shape[1], kernel, stride, padding, ceil_mode),
        _pool_padding(x.shape[2], kernel, stride, padding, ceil_mode),
        (0, 0),
    )
    init = np.array(-np.inf, x.dtype)  # a concrete init: a traced one breaks jax.grad under jit
    return jax.lax.reduce_window(
        x, init, jax.lax.max, (1, kernel, kernel, 1), (1, stride, stride, 1), pads
    )


def avg_pool_count_pad(x: jax.Array, kernel: int, stride: int, padding: int) -> jax.Array:
    """`nn.AvgPool2d(kernel, stride, padding)` (count_include_pad=True, floor mode)."""
    pads = (
        (0, 0),
        _pool_padding(x.shape[1], kernel, stride, padding, False),
        _pool_padding(x.shape[2], kernel, stride, padding, False),
        (0, 0),
    )
    summed = jax.lax.reduce_window(
        x, np.array(0, x.dtype), jax.lax.add, (1, kernel, kernel, 1), (1, stride, stride, 1), pads
    )
    return summed / jnp.asarray(kernel * kernel, x.dtype)


def channel_dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
    """`nn.Dropout2d(rate)`: one keep/drop decision per (sample, channel), shared over H, W."""
    return nnx.Dropout(rate, broadcast_dims=(1, 2), rngs=rngs)


class BatchNorm(nnx.Module):
    """`nn.BatchNorm2d` on `(B, H, W, C)` with PyTorch's running-statistics semantics.

    momentum: PyTorch convention, `running = (1 - momentum) * running + momentum * batch`
      (flax's momentum is `1 - momentum`). The running variance uses the unbiased batch variance.
    frozen: always normalise with the running statistics and never update them (the official
      `freeze_bn()`: BN modules in eval mode while the network trains; scale/bias still learn).
    """

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = 0.1,
        epsilon: float = 1e-5,
        frozen: bool = False,
        dtype=jnp.float32,
    ):
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.momentum = momentum
        self.epsilon = epsilon
        self.frozen = frozen
        self.dtype = dtype
        self.use_running_average = False

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_running_average or self.frozen:
            mean, var = self.mean[...], self.var[...]
        else:
            xf = x.astype(jnp.float32)
            mean = jnp.mean(xf, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))
            count = x.shape[0] * x.shape[1] * x.shape[2]
            unbiased = var * (count / max(count - 1, 1))
            m = self.momentum
            self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
            self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased)
        inv = jax.lax.rsqrt(var + self.epsilon) * self.scale[...]
        y = (x.astype(jnp.float32) - mean) * inv + self.bias[...]
        return y.astype(self.dtype)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """`F.normalize(x, dim=axis)`: x / max(||x||, eps), with a finite gradient at x = 0."""
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    # sqrt(max(sq, eps^2)) == max(sqrt(sq), eps); the max keeps sqrt away from 0 for the gradient.
    return x / jnp.sqrt(jnp.maximum(sq, eps * eps))


def check_images(images: jax.Array, name: str = "images") -> None:
    """Raise a ValueError unless `images` is `(B, H, W, 3)`."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{name} must be (B, H, W, 3) Caffe-normalised BGR, got shape {images.shape}")

"""Stage-3 segmentation losses: the noise-aware loss (NAL) and the alternatives of the supplement.

Every function is pure JAX. The model gives scores at feature resolution `(B, h, w, C)`: cosines
`cos(phi(p), W_c)` for the cosine classifier (tau NOT applied) or logits for the dot-product one.
They are upsampled to the crop `(B, S, S, C)` bilinearly with align_corners=True, as the official
code does, and compared with the stage-2 pseudo labels `y_crf`, `y_ret` `(B, S, S)` (255 = ignore).

Regions, as in the official code (`unrel = (mask_fin == 255) & (mask_crf != 255)`):
  reliable   S  = {y_crf == y_ret, y_crf != 255}     targets y_crf
  unreliable ~S = {y_crf != y_ret, y_crf != 255}     (padding, 255 in both, is in neither)

Losses (`kind` of `segmentation_loss`):
  "nal"          L_ce(S) + lam * sum_{~S} sigma CE(p, y_crf) / sum_{~S} sigma,
                 sigma = (D_{y_crf} / max_c D_c)^gamma, D_c = 1 + cos_c   (main paper Eq. 9-11)
  "ce_reliable"  L_ce(S) only (the baseline)
  "ce_crf"       CE on every labelled pixel of y_crf
  "ce_ret"       CE on every labelled pixel of y_ret
  "entropy"      L_ce(S) + lam * mean_{~S} -sum_c H_c log H_c            (supplement Eq. 4-5)
  "bootstrap"    L_ce(S) + lam * mean_{~S} -sum_c Y_c log H_c,
                 Y = beta onehot(y_crf) + (1 - beta) H, beta = (1 - step / max_steps)^power  (Eq. 6-8)
with H = softmax(tau * cos) (cosine) or softmax(logits) (dot product). Means over empty regions and
a zero sum of sigma give 0 instead of PyTorch's NaN.

Supplement Eq. 6 writes the bootstrapping sum over S; Sec. 5 introduces these losses for ~S and
on S the target is y_crf already, so we apply it on ~S like entropy regularisation.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from bana_jax.constants import IGNORE_INDEX
from bana_jax.resize import resize_bilinear

LOSS_KINDS = ("nal", "ce_reliable", "ce_crf", "ce_ret", "entropy", "bootstrap")
CLASSIFIERS = ("cosine", "dot")


# ----------------------------------------------------------------------------------------------
# Building blocks on upsampled maps (B, S, S, C).


def upsample_scores(scores: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """Scores `(B, h, w, C)` -> `(B, out_h, out_w, C)`, bilinear with align_corners=True."""
    return resize_bilinear(scores, out_hw, align_corners=True)


def region_masks(y_crf: jax.Array, y_ret: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Reliable and unreliable masks, bool `(B, S, S)` each (see the module docstring)."""
    labelled = y_crf != IGNORE_INDEX
    agree = y_crf == y_ret
    return agree & labelled, ~agree & labelled


def _safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, and 0 where den == 0 (with a finite gradient there)."""
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1.0), 0.0)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `values` over `mask` (same shape); 0 when the mask is empty."""
    mask = mask.astype(values.dtype)
    return _safe_divide(jnp.sum(values * mask), jnp.sum(mask))


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """-log softmax(logits)[label] per pixel, `(B, S, S)`; ignored labels (255) give 0."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    valid = labels != IGNORE_INDEX
    safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
    picked = jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
    return jnp.where(valid, -picked, 0.0)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean CE over pixels with `labels != 255` (and `mask`), like `nn.CrossEntropyLoss(ignore_index=255)`."""
    valid = labels != IGNORE_INDEX
    if mask is not None:
        valid = valid & mask
    return masked_mean(pixel_cross_entropy(logits, labels), valid)


def noise_aware_sigma(cosine: jax.Array, y_crf: jax.Array, gamma: float) -> jax.Array:
    """sigma = (D_{y_crf} / max_c D_c)^gamma with D_c = 1 + cos_c, `(B, S, S)` in [0, 1].

    Only the y_crf class's distance enters (not every class's). Pixels labelled 255 get 0.
    D is clipped at 0 so a cosine a rounding error below -1 cannot make the ratio negative.
    """
    distance = jnp.maximum(1.0 + cosine, 0.0)
    valid = y_crf != IGNORE_INDEX
    target = jnp.where(valid, y_crf, 0).astype(jnp.int32)
    target_distance = jnp.take_along_axis(distance, target[..., None], axis=-1)[..., 0]
    ratio = _safe_divide(target_distance, jnp.max(distance, axis=-1))
    return jnp.where(valid, ratio**gamma, 0.0)


def weighted_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array,
                           mask: jax.Array) -> jax.Array:
    """sum_{mask} w CE / sum_{mask} w; 0 when the weights sum to 0 (e.g. empty mask)."""
    weights = jnp.where(mask & (labels != IGNORE_INDEX), weights, 0.0)
    return _safe_divide(jnp.sum(weights * pixel_cross_entropy(logits, labels)), jnp.sum(weights))


def entropy(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over `mask` of -sum_c H_c log H_c, H = softmax(logits) (supplement Eq. 4)."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    pixel_entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    return masked_mean(pixel_entropy, mask)


def poly_beta(step, max_steps, power: float = 0.9) -> jax.Array:
    """Bootstrapping balance beta = (1 - step / max_steps)^power, from 1 at step 0 to 0 at the end."""
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / jnp.asarray(max_steps, jnp.float32), 0.0, 1.0)
    return (1.0 - progress) ** power


def bootstrap(logits: jax.Array, labels: jax.Array, beta, mask: jax.Array, *,
              detach_target: bool = True) -> jax.Array:
    """Mean over `mask` of -sum_c Y_c log H_c, Y = beta onehot(labels) + (1 - beta) H (Eq. 6-7).

    The target Y is the E-step estimate, held fixed (stop_gradient) unless detach_target=False.
    """
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    probs = jnp.exp(log_probs)
    if detach_target:
        probs = jax.lax.stop_gradient(probs)
    valid = labels != IGNORE_INDEX
    onehot = jax.nn.one_hot(jnp.where(valid, labels, 0), logits.shape[-1], dtype=logits.dtype)
    target = beta * onehot + (1.0 - beta) * probs
    return masked_mean(-jnp.sum(target * log_probs, axis=-1), mask & valid)


# ----------------------------------------------------------------------------------------------
# Full losses.


def noise_aware_loss(cosine: jax.Array, y_crf: jax.Array, y_ret: jax.Array, *, tau: float,
                     lam: float, gamma: float, detach_sigma: bool = False) -> tuple[jax.Array, dict]:
    """NAL on upsampled cosines `(B, S, S, C)`; returns (loss, aux).

    detach_sigma=False follows the official code: gradients also flow through sigma.
    """
    reliable, unreliable = region_masks(y_crf, y_ret)
    logits = tau * cosine
    loss_ce = cross_entropy(logits, y_crf, reliable)
    sigma = noise_aware_sigma(cosine, y_crf, gamma)
    if detach_sigma:
        sigma = jax.lax.stop_gradient(sigma)
    loss_wce = weighted_cross_entropy(logits, y_crf, sigma, unreliable)
    aux = {"ce": loss_ce, "wce": loss_wce, "sigma_mean": masked_mean(jax.lax.stop_gradient(sigma), unreliable)}
    return loss_ce + lam * loss_wce, aux


def _check_inputs(scores, y_crf, y_ret, kind, classifier):
    if kind not in LOSS_KINDS:
        raise ValueError(f"kind must be one of {LOSS_KINDS}, got {kind!r}")
    if classifier not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {classifier!r}")
    if kind == "nal" and classifier != "cosine":
        # D_c = 1 + cos_c is a distance on the unit sphere in [0, 2]; dot-product logits are
        # unbounded, so sigma would be neither in [0, 1] nor the paper's quantity.
        raise ValueError("kind='nal' needs classifier='cosine' (sigma is defined from cosines "
                         f"D_c = 1 + cos in [0, 2]); got classifier={classifier!r}")
    if scores.ndim != 4:
        raise ValueError(f"scores must be (B, h, w, C), got shape {scores.shape}")
    for name, labels in (("y_crf", y_crf), ("y_ret", y_ret)):
        if labels.ndim != 3 or labels.shape[0] != scores.shape[0]:
            raise ValueError(f"batch[{name!r}] must be (B, S, S) with B={scores.shape[0]}, got {labels.shape}")
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise TypeError(f"batch[{name!r}] must be an integer label map (uint8), got {labels.dtype}")
    if y_crf.shape != y_ret.shape:
        raise ValueError(f"y_crf and y_ret differ in shape: {y_crf.shape} vs {y_ret.shape}")


def segmentation_loss(scores: jax.Array, batch: dict[str, Any], *, kind: str = "nal",
                      tau: float = 20.0, lam: float = 0.1, gamma: float = 7.0, step=0,
                      max_steps=1, classifier: str = "cosine", detach_sigma: bool = False,
                      bootstrap_power: float = 0.9,
                      detach_bootstrap_target: bool = True) -> tuple[jax.Array, dict]:
    """Stage-3 loss of any `kind` (see module docstring); returns (loss, aux dict of scalars).

    Args:
      scores: `(B, h, w, C)` cosines (classifier='cosine', tau applied here) or dot-product
        logits (classifier='dot', tau not used) at feature resolution.
      batch: dict with `y_crf`, `y_ret` uint8 `(B, S, S)`, 255 = ignore.
      kind: one of LOSS_KINDS.
      tau: cosine scale. lam: weight of the ~S term. gamma: NAL sigma exponent.
      step, max_steps: training progress for the bootstrapping beta (may be traced).
      detach_sigma: stop gradients through sigma (the official code does not).
      bootstrap_power, detach_bootstrap_target: beta schedule exponent; hold Y fixed.

    aux always holds `ce` (the CE term), `reliable_fraction` (|S| / labelled pixels of y_crf);
    plus `wce`, `sigma_mean` (nal), `entropy` (entropy), `bootstrap`, `beta` (bootstrap).
    """
    y_crf, y_ret = jnp.asarray(batch["y_crf"]), jnp.asarray(batch["y_ret"])
    _check_inputs(scores, y_crf, y_ret, kind, classifier)
    upsampled = upsample_scores(scores, y_crf.shape[1:3])
    logits = tau * upsampled if classifier == "cosine" else upsampled
    reliable, unreliable = region_masks(y_crf, y_ret)
    aux = {"reliable_fraction": masked_mean(reliable.astype(jnp.float32), y_crf != IGNORE_INDEX)}

    if kind == "nal":
        loss, nal_aux = noise_aware_loss(upsampled, y_crf, y_ret, tau=tau, lam=lam, gamma=gamma,
                                         detach_sigma=detach_sigma)
        return loss, {**aux, **nal_aux}
    if kind == "ce_crf":
        loss = cross_entropy(logits, y_crf)
        return loss, {**aux, "ce": loss}
    if kind == "ce_ret":
        loss = cross_entropy(logits, y_ret)
        return loss, {**aux, "ce": loss}

    loss_ce = cross_entropy(logits, y_crf, reliable)
    aux["ce"] = loss_ce
    if kind == "ce_reliable":
        return loss_ce, aux
    if kind == "entropy":
        aux["entropy"] = entropy(logits, unreliable)
        return loss_ce + lam * aux["entropy"], aux
    # kind == "bootstrap"
    beta = poly_beta(step, max_steps, bootstrap_power)
    aux["beta"] = beta
    aux["bootstrap"] = bootstrap(logits, y_crf, beta, unreliable, detach_target=detach_bootstrap_target)
    return loss_ce + lam * aux["bootstrap"], aux

"""Stage-3 losses against per-pixel NumPy transcriptions of supplement Eq. 4-8."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from bana_jax import losses
from bana_jax.constants import IGNORE_INDEX



# ----------------------------------------------------------------------------------------------
# NumPy references (float64, one pixel at a time).


def upsample_ref(x, out_h, out_w):
    """Bilinear, align_corners=True, from the textbook formula. x: (B, h, w, C)."""
    b, h, w, c = x.shape
    out = np.zeros((b, out_h, out_w, c))
    for i in range(out_h):
        sy = i * (h - 1) / (out_h - 1)
        y0 = min(int(np.floor(sy)), h - 1)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for j in range(out_w):
            sx = j * (w - 1) / (out_w - 1)
            x0 = min(int(np.floor(sx)), w - 1)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            out[:, i, j] = ((1 - fy) * ((1 - fx) * x[:, y0, x0] + fx * x[:, y0, x1])
                            + fy * ((1 - fx) * x[:, y1, x0] + fx * x[:, y1, x1]))
    return out


def softmax_ref(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def pixels(y_crf, y_ret):
    """Yields (b, i, j, region) with region 'S', '~S' or None (padding), as the paper defines them."""
    for b, i, j in np.ndindex(*y_crf.shape):
        c, r = int(y_crf[b, i, j]), int(y_ret[b, i, j])
        if c == IGNORE_INDEX:
            yield b, i, j, None
        else:
            yield b, i, j, ("S" if c == r else "~S")


def ce_ref(z, label):
    return -np.log(softmax_ref(z)[label])


def loss_ref(scores, y_crf, y_ret, *, kind, tau=20.0, lam=0.1, gamma=7.0, beta=1.0, cosine=True,
             sigma_scores=None, target_scores=None, wrong_re_sigma=False):
    """Direct transcription. sigma_scores / target_scores: evaluate sigma / the bootstrap H
    at other (fixed) scores, for the gradients of the detached variants."""
    up = upsample_ref(np.asarray(scores, np.float64), *y_crf.shape[1:])
    up_sigma = up if sigma_scores is None else upsample_ref(sigma_scores, *y_crf.shape[1:])
    up_target = up if target_scores is None else upsample_ref(target_scores, *y_crf.shape[1:])
    scale = tau if cosine else 1.0
    if kind in ("ce_crf", "ce_ret"):
        labels = y_crf if kind == "ce_crf" else y_ret
        terms = [ce_ref(scale * up[b, i, j], labels[b, i, j])
                 for b, i, j in np.ndindex(*labels.shape) if labels[b, i, j] != IGNORE_INDEX]
        return np.mean(terms)
    ce_s, unrel = [], []
    for b, i, j, region in pixels(y_crf, y_ret):
        if region == "S":
            ce_s.append(ce_ref(scale * up[b, i, j], y_crf[b, i, j]))
        elif region == "~S":
            unrel.append((b, i, j))
    loss_ce = np.mean(ce_s) if ce_s else 0.0
    if kind == "ce_reliable":
        return loss_ce
    if kind == "nal":
        num = den = 0.0
        for b, i, j in unrel:
            c_star = y_crf[b, i, j]
            dist = 1.0 + up_sigma[b, i, j]
            if wrong_re_sigma:  # the [Re] reproduction: every class weighted by its own sigma_c
                for c in range(dist.size):
                    sigma_c = (dist[c] / dist.max()) ** gamma
                    num += sigma_c * ce_ref(scale * up[b, i, j], c)
                    den += sigma_c
                continue
            sigma = (dist[c_star] / dist.max()) ** gamma
            num += sigma * ce_ref(scale * up[b, i, j], c_star)
            den += sigma
        return loss_ce + lam * (num / den if den > 0 else 0.0)
    if kind == "entropy":
        ent = []
        for b, i, j in unrel:
            h = softmax_ref(scale * up[b, i, j])
            ent.append(-np.sum(h * np.log(h)))
        return loss_ce + lam * (np.mean(ent) if ent else 0.0)
    if kind == "bootstrap":
        bs = []
        for b, i, j in unrel:
            h = softmax_ref(scale * up[b, i, j])
            y = np.zeros_like(h)
            y[y_crf[b, i, j]] = 1.0
            target = beta * y + (1 - beta) * softmax_ref(scale * up_target[b, i, j])
            bs.append(-np.sum(target * np.log(h)))
        return loss_ce + lam * (np.mean(bs) if bs else 0.0)
    raise ValueError(kind)


def finite_difference_grad(f, x, eps=1e-6):
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        grad[idx] = (f(xp) - f(xm)) / (2 * eps)
    return grad


# ----------------------------------------------------------------------------------------------
# Random problems.


def make_problem(seed, b=2, h=3, w=4, s=7, c=5, pad=True):
    rng = np.random.default_rng(seed)
    # Cosines spread over (-1, 1).
    scores = rng.uniform(-0.95, 0.95, (b, h, w, c)).astype(np.float32)
    y_crf = rng.integers(0, c, (b, s, s)).astype(np.uint8)
    y_ret = y_crf.copy()
    flip = rng.random((b, s, s)) < 0.4  # ~40% unreliable
    y_ret[flip] = (y_crf[flip] + rng.integers(1, c, flip.sum())) % c
    if pad:  # padding: 255 in both, as the data pipeline makes it
        y_crf[:, -2:, :] = IGNORE_INDEX
        y_ret[:, -2:, :] = IGNORE_INDEX
        y_ret[0, 0, :2] = IGNORE_INDEX  # y_ret ignored alone: such a pixel is unreliable (official rule)
    return scores, {"y_crf": y_crf, "y_ret": y_ret}


KINDS = ["nal", "ce_reliable", "ce_crf", "ce_ret", "entropy", "bootstrap"]


@pytest.mark.parametrize("kind", KINDS)
def test_values_match_numpy(kind):
    scores, batch = make_problem(0)
    step, max_steps = 30, 100
    loss, aux = losses.segmentation_loss(jnp.asarray(scores), batch, kind=kind, tau=20.0, lam=0.1,
                                         gamma=7.0, step=step, max_steps=max_steps)
    ref = loss_ref(scores, batch["y_crf"], batch["y_ret"], kind=kind, beta=(1 - step / max_steps) ** 0.9)
    np.testing.assert_allclose(float(loss), ref, rtol=2e-5)
    assert np.isfinite(float(aux["ce"]))


@pytest.mark.parametrize("kind,options", [
    ("nal", {}),
    ("nal", {"detach_sigma": True}),
    ("ce_reliable", {}),
    ("ce_crf", {}),
    ("ce_ret", {}),
    ("entropy", {}),
    ("bootstrap", {}),
    ("bootstrap", {"detach_bootstrap_target": False}),
])
def test_gradients_match_finite_differences(kind, options):
    # Tiny case; tau = 5 keeps the float32 gradient well conditioned.
    scores, batch = make_problem(1, b=1, h=2, w=3, s=4, c=3, pad=False)
    batch["y_crf"][0, -1, -1] = IGNORE_INDEX
    batch["y_ret"][0, -1, -1] = IGNORE_INDEX
    tau, gamma, step, max_steps = 5.0, 3.0, 2, 5
    beta = (1 - step / max_steps) ** 0.9

    def jax_loss(x):
        return losses.segmentation_loss(x, batch, kind=kind, tau=tau, gamma=gamma, lam=0.5, step=step,
                                        max_steps=max_steps, **options)[0]

    grad = np.asarray(jax.grad(jax_loss)(jnp.asarray(scores)))
    fixed = scores.astype(np.float64)
    sigma_scores = fixed if options.get("detach_sigma") else None
    target_scores = fixed if kind == "bootstrap" and options.get("detach_bootstrap_target", True) else None

    def ref_loss(x):
        return loss_ref(x, batch["y_crf"], batch["y_ret"], kind=kind, tau=tau, gamma=gamma, lam=0.5,
                        beta=beta, sigma_scores=sigma_scores, target_scores=target_scores)

    ref_grad = finite_difference_grad(ref_loss, fixed)
    assert np.abs(ref_grad).max() > 1e-3  # the test sees a real gradient
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-3, atol=2e-5 * np.abs(ref_grad).max())


def test_detached_and_attached_sigma_differ_in_gradient_only():
    scores, batch = make_problem(2)
    x = jnp.asarray(scores)
    f = lambda x, d: losses.segmentation_loss(x, batch, kind="nal", detach_sigma=d)[0]  # noqa: E731
    assert float(f(x, True)) == pytest.approx(float(f(x, False)), rel=1e-7)
    g_attached, g_detached = jax.grad(f)(x, False), jax.grad(f)(x, True)
    assert float(jnp.abs(g_attached - g_detached).max()) > 1e-4


def test_nal_equals_ce_when_everything_is_reliable():
    scores, batch = make_problem(3)
    batch["y_ret"] = batch["y_crf"].copy()
    nal, aux = losses.segmentation_loss(jnp.asarray(scores), batch, kind="nal")
    ce, _ = losses.segmentation_loss(jnp.asarray(scores), batch, kind="ce_crf")
    assert float(nal) == pytest.approx(float(ce), rel=1e-6)
    assert float(aux["wce"]) == 0.0
    assert float(aux["reliable_fraction"]) == 1.0


def test_sigma_in_unit_interval_and_one_at_the_best_class():
    rng = np.random.default_rng(4)
    cosine = rng.uniform(-1, 1, (2, 6, 6, 7)).astype(np.float32)
    cosine[0, 0, 0] = -1.0  # every D = 0: guarded, sigma = 0
    cosine[0, 0, 1] = 1.0
    y_crf = rng.integers(0, 7, (2, 6, 6)).astype(np.uint8)
    y_crf[1, 0, 0] = IGNORE_INDEX
    sigma = np.asarray(losses.noise_aware_sigma(jnp.asarray(cosine), jnp.asarray(y_crf), 7.0))
    assert np.all(np.isfinite(sigma)) and sigma.min() >= 0.0 and sigma.max() <= 1.0
    best = cosine.argmax(-1) == y_crf
    np.testing.assert_allclose(sigma[best], 1.0, rtol=1e-6)
    assert sigma[0, 0, 0] == 0.0 and sigma[0, 0, 1] == 1.0 and sigma[1, 0, 0] == 0.0
    # Direct formula on one pixel.
    d = 1.0 + cosine[1, 3, 4].astype(np.float64)
    assert sigma[1, 3, 4] == pytest.approx((d[y_crf[1, 3, 4]] / d.max()) ** 7, rel=1e-5)


def test_nal_weights_only_the_crf_class():
    """The [Re] reproduction weighted every class's CE by its own sigma_c; only c* = y_crf counts.

    Two unreliable pixels: at A, y_crf is the worst class (cos = -1, so sigma = 0), at B the best
    (sigma = 1). The weighted term is then exactly CE at B. Weighting every class gives A weight.
    """
    c, tau = 3, 2.0  # small tau: CE values of order 1, exact in float32
    cos_a = np.array([-1.0, 0.5, 0.2])  # y_crf = 0
    cos_b = np.array([0.1, 0.8, -0.3])  # y_crf = 1
    scores = np.zeros((1, 2, 2, c), np.float32)  # 2x2 map upsampled to 2x2: the identity
    scores[0, 0, 0], scores[0, 0, 1] = cos_a, cos_b
    scores[0, 1, 0] = scores[0, 1, 1] = [0.3, 0.0, 0.0]
    y_crf = np.array([[[0, 1], [0, IGNORE_INDEX]]], np.uint8)
    y_ret = np.array([[[2, 0], [0, IGNORE_INDEX]]], np.uint8)  # (0,0), (0,1) unreliable; (1,0) reliable
    batch = {"y_crf": y_crf, "y_ret": y_ret}
    loss, aux = losses.segmentation_loss(jnp.asarray(scores), batch, kind="nal", tau=tau, lam=0.1)
    ce_b = -np.log(np.exp(tau * 0.8) / np.exp(tau * cos_b).sum())  # by hand
    ce_rel = -np.log(np.exp(tau * 0.3) / np.exp(tau * np.array([0.3, 0.0, 0.0])).sum())
    assert float(aux["wce"]) == pytest.approx(ce_b, rel=1e-5)
    assert float(loss) == pytest.approx(ce_rel + 0.1 * ce_b, rel=1e-5)
    wrong = loss_ref(scores, y_crf, y_ret, kind="nal", tau=tau, lam=0.1, wrong_re_sigma=True)
    wrong_wce = (wrong - ce_rel) / 0.1
    assert abs(float(aux["wce"]) - wrong_wce) > 0.1, (float(aux["wce"]), wrong_wce)


def test_guards_give_zero_not_nan():
    # No reliable pixel and every unreliable sigma = 0: both terms are 0, gradients finite.
    scores = np.full((1, 2, 2, 3), 0.5, np.float32)
    scores[..., 0] = -1.0
    y_crf = np.zeros((1, 2, 2), np.uint8)
    y_ret = np.ones((1, 2, 2), np.uint8)
    batch = {"y_crf": y_crf, "y_ret": y_ret}
    for kind in KINDS:
        loss, aux = losses.segmentation_loss(jnp.asarray(scores), batch, kind=kind)
        grad = jax.grad(lambda x: losses.segmentation_loss(x, batch, kind=kind)[0])(jnp.asarray(scores))
        assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad))), kind
    loss, aux = losses.segmentation_loss(jnp.asarray(scores), batch, kind="nal")
    assert float(loss) == 0.0 and float(aux["ce"]) == 0.0 and float(aux["wce"]) == 0.0
    # All padding.
    batch = {"y_crf": np.full((1, 2, 2), IGNORE_INDEX, np.uint8), "y_ret": np.full((1, 2, 2), IGNORE_INDEX, np.uint8)}
    assert float(losses.segmentation_loss(jnp.asarray(scores), batch, kind="nal")[0]) == 0.0


def test_poly_beta_schedule():
    assert float(losses.poly_beta(0, 100)) == 1.0
    assert float(losses.poly_beta(100, 100)) == 0.0
    assert float(losses.poly_beta(50, 100, 0.9)) == pytest.approx(0.5**0.9, rel=1e-6)
    assert float(losses.poly_beta(150, 100)) == 0.0  # clipped past the end
    scores, batch = make_problem(5)
    # beta = 1: bootstrapping is CE with y_crf on ~S.
    _, aux0 = losses.segmentation_loss(jnp.asarray(scores), batch, kind="bootstrap", step=0, max_steps=10)
    ref = loss_ref(scores, batch["y_crf"], batch["y_ret"], kind="bootstrap", lam=1.0, beta=1.0) - \
        loss_ref(scores, batch["y_crf"], batch["y_ret"], kind="ce_reliable")
    assert float(aux0["bootstrap"]) == pytest.approx(ref, rel=1e-5)
    assert float(aux0["beta"]) == 1.0


def test_dot_product_classifier():
    scores, batch = make_problem(6)
    logits = 3.0 * scores  # unbounded logits; tau is not applied to them
    for kind in ("ce_reliable", "ce_crf", "ce_ret", "entropy", "bootstrap"):
        loss, _ = losses.segmentation_loss(jnp.asarray(logits), batch, kind=kind, classifier="dot",
                                           tau=20.0, step=1, max_steps=4)
        ref = loss_ref(logits, batch["y_crf"], batch["y_ret"], kind=kind, cosine=False, beta=0.75**0.9)
        np.testing.assert_allclose(float(loss), ref, rtol=2e-5, err_msg=kind)
    with pytest.raises(ValueError, match="needs classifier='cosine'"):
        losses.segmentation_loss(jnp.asarray(logits), batch, kind="nal", classifier="dot")


def test_jit_and_bad_inputs():
    scores, batch = make_problem(7)
    f = jax.jit(lambda x, b, step: losses.segmentation_loss(x, b, kind="bootstrap", step=step, max_steps=10))
    loss, aux = f(jnp.asarray(scores), batch, 3)
    assert float(aux["beta"]) == pytest.approx(0.7**0.9, rel=1e-6) and np.isfinite(float(loss))
    nal_jit = jax.jit(lambda x, b: losses.segmentation_loss(x, b, kind="nal")[0])(jnp.asarray(scores), batch)
    nal_eager = losses.segmentation_loss(jnp.asarray(scores), batch, kind="nal")[0]
    assert float(nal_jit) == pytest.approx(float(nal_eager), rel=1e-6)
    with pytest.raises(ValueError, match="kind must be one of"):
        losses.segmentation_loss(jnp.asarray(scores), batch, kind="focal")
    with pytest.raises(ValueError, match=r"scores must be \(B, h, w, C\)"):
        losses.segmentation_loss(jnp.asarray(scores[0]), batch)
    with pytest.raises(ValueError, match="y_ret"):
        losses.segmentation_loss(jnp.asarray(scores), {**batch, "y_ret": batch["y_ret"][:1]})
    with pytest.raises(TypeError, match="integer label map"):
        losses.segmentation_loss(jnp.asarray(scores), {**batch, "y_crf": batch["y_crf"].astype(np.float32)})

"""`bana compare-torch`: run a checkpoint through PyTorch and JAX and report the differences.

    bana compare-torch --arch {labeler,deeplab_v1,deeplab_v2} --checkpoint FILE.pt [--size H W]

Builds the network in PyTorch (`bana_jax.models.torch_reference`, plain torch.nn with the official
key names) and in Flax with the same weights, feeds both the same Caffe-normalised input (random,
or `--image`), eval mode, and prints the max absolute / relative difference
(`max|jax - torch| / max|torch|`) after each stage and for the class scores. Exit status 1 when a
relative difference exceeds `--tol`. The architecture widths/depths are read from the checkpoint,
so reduced test checkpoints work too. Needs torch (the `torch` extra).
"""

from __future__ import annotations

import argparse
import re
import sys

import jax
import numpy as np
from flax import nnx
from PIL import Image

from bana_jax.constants import CAFFE_MEAN_BGR
from bana_jax.models import DeepLab, Labeler, make_backbone
from bana_jax.models.torch_import import _normalise_keys, load_checkpoint
from bana_jax.models.torch_io import read_state_dict

ARCHS = ("labeler", "deeplab_v1", "deeplab_v2")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bana compare-torch", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=ARCHS, required=True)
    p.add_argument("--checkpoint", required=True, help="official PyTorch state dict (.pt/.pth)")
    p.add_argument("--size", type=int, nargs=2, default=(161, 161), metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--image", help="RGB image to use instead of random input (resized to --size)")
    p.add_argument("--classifier", choices=("cosine", "dot"), default=None,
                   help="score head (default: dot for the labeler, cosine for DeepLab)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-4, help="max relative difference allowed")
    return p


def infer_architecture(arch: str, state_dict: dict[str, np.ndarray]) -> dict:
    """Network sizes from the checkpoint's shapes (`num_classes`, widths, depths)."""
    def need(key):
        if key not in state_dict:
            raise ValueError(f"--arch {arch}: checkpoint has no key {key!r}")
        return state_dict[key].shape

    spec = {"num_classes": need("classifier.weight")[0]}
    if arch == "deeplab_v2":
        blocks = []
        for layer in range(2, 6):
            ids = {int(m.group(1)) for k in state_dict
                   if (m := re.match(rf"backbone\.layer{layer}\.block(\d+)\.", k))}
            blocks.append(max(ids) if ids else 0)
        spec.update(n_blocks=tuple(blocks), base=need("backbone.layer1.conv1.conv.weight")[0],
                    aspp_dim=need("c1.weight")[0])
    else:
        spec.update(widths=tuple(need(f"backbone.conv{b}_1.weight")[0] for b in range(1, 6)),
                    fc_dim=need("backbone.fc6.weight")[0])
    return spec


def _build(arch: str, spec: dict, classifier: str):
    """(torch net, jax model factory)."""
    from bana_jax.models import torch_reference as ref  # noqa: PLC0415 - imports torch (optional)

    c = spec["num_classes"]
    if arch == "deeplab_v2":
        net = ref.DeepLabV2Ref(c, spec["n_blocks"], spec["base"], spec["aspp_dim"])
        factory = lambda: DeepLab(  # noqa: E731
            "v2", c, classifier=classifier, resnet_blocks=spec["n_blocks"],
            resnet_base_width=spec["base"], aspp_dim=spec["aspp_dim"], rngs=nnx.Rngs(0))
    elif arch == "deeplab_v1":
        net = ref.DeepLabV1Ref(c, spec["widths"], spec["fc_dim"])
        factory = lambda: DeepLab(  # noqa: E731
            "v1", c, classifier=classifier, vgg_widths=spec["widths"], fc_dim=spec["fc_dim"],
            rngs=nnx.Rngs(0))
    else:
        net = ref.LabelerRef(c, spec["widths"], spec["fc_dim"])
        factory = lambda: Labeler(make_backbone(  # noqa: E731
            "vgg16", fc6_dilation=1, vgg_widths=spec["widths"], fc_dim=spec["fc_dim"],
            rngs=nnx.Rngs(0)), c, rngs=nnx.Rngs(0))
    return net, factory


def _input(args) -> np.ndarray:
    h, w = args.size
    if args.image:
        rgb = np.asarray(Image.open(args.image).convert("RGB").resize((w, h), Image.BILINEAR), np.float32)
        one = rgb[..., ::-1] - CAFFE_MEAN_BGR
        return np.repeat(one[None], args.batch, axis=0).astype(np.float32)
    return np.random.default_rng(args.seed).normal(0, 60, (args.batch, h, w, 3)).astype(np.float32)


def compare(arch: str, state_dict: dict[str, np.ndarray], images: np.ndarray,
            classifier: str | None = None) -> list[tuple[str, tuple, float, float]]:
    """[(stage, shape, max abs diff, max rel diff)] for one checkpoint and NHWC input."""
    import torch  # noqa: PLC0415

    from bana_jax.models import torch_reference as ref  # noqa: PLC0415 - imports torch (optional)
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    classifier = classifier or ("dot" if arch == "labeler" else "cosine")
    spec = infer_architecture(arch, state_dict)
    net, factory = _build(arch, spec, classifier)
    net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, strict=True)
    net.eval()
    model = nnx.eval_shape(factory)
    load_checkpoint(model, state_dict)
    model.eval()

    x_t = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    score_fn = ref.cosine_scores if classifier == "cosine" else ref.dot_scores
    with torch.no_grad():
        theirs = dict(net.backbone(x_t, return_stages=True))
        feats_t = net(x_t)
        if arch == "deeplab_v2":
            theirs["aspp"] = feats_t
        theirs["scores"] = score_fn(feats_t, net.classifier)
    theirs = {k: v.permute(0, 2, 3, 1).numpy() for k, v in theirs.items()}

    @nnx.jit
    def run(model, x):
        stages = dict(model.backbone(x, return_stages=True))
        feats = model(x) if arch == "labeler" else model.features(x)
        if arch == "deeplab_v2":
            stages["aspp"] = feats
        stages["scores"] = model.classifier(feats)
        return stages

    ours = jax.device_get(run(model, jax.numpy.asarray(images)))
    rows = []
    for name, ref_value in theirs.items():
        diff = np.abs(np.asarray(ours[name], np.float64) - ref_value)
        rows.append((name, ref_value.shape, float(diff.max()),
                     float(diff.max() / max(np.abs(ref_value).max(), 1e-12))))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        import torch  # noqa: F401,PLC0415
    except ImportError:
        print("compare-torch needs PyTorch: pip install 'bana-jax[torch]'", file=sys.stderr)
        return 2
    state_dict = _normalise_keys(read_state_dict(args.checkpoint))
    rows = compare(args.arch, state_dict, _input(args), args.classifier)
    print(f"{'stage':<8} {'shape (NHWC)':<22} {'max abs diff':>13} {'max rel diff':>13}")
    for name, shape, abs_diff, rel in rows:
        print(f"{name:<8} {str(tuple(shape)):<22} {abs_diff:13.3e} {rel:13.3e}")
    worst = max(r[3] for r in rows)
    ok = worst <= args.tol
    print(f"{'OK' if ok else 'MISMATCH'}: worst relative difference {worst:.3e} (tol {args.tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

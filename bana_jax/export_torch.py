"""`bana export-torch`: a trained network as a PyTorch state dict with the official BANA key names.

    bana export-torch --workdir=RUN [--out FILE.pth]

RUN is a finished `bana stage1` run (a labeler in `model.json` + `model/`: the official `models.ClsNet.Labeler`)
or a `bana stage3` run (`model.json` + `model/` or a train checkpoint: `models.SegNet.DeepLab_LargeFOV`
for deeplab_v1, `DeepLab_ASPP` for deeplab_v2). The file is written with `torch.save` (the `torch`
extra), to a temporary name then renamed, and the official modules load it with `strict=True`
(BatchNorm `num_batches_tracked` counters included). Default FILE: RUN/<architecture>.pth, e.g.
RUN/labeler.pth, the `weights/ClsNet.pt` of the official stage 2.

`vgg_tiny` runs (the demo's trunk, plain VGG) are written with the same key names at their reduced
widths: they load into modules of those widths (bana_jax.models.torch_reference), not into the
official VGG16 ones. Networks the official code has no module for (EfficientNet-Lite0, VGG with
BatchNorm, a labeler with fc6 dilation other than 1) are refused.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from bana_jax import artifacts
from bana_jax.models.torch_import import torch_state_dict
from bana_jax.stage3 import load_trained_deeplab

# Our stage-1 / stage-3 model names -> the official module that loads the export.
LABELER_MODULES = {"vgg16_labeler": "models.ClsNet.Labeler",
                   "vgg_tiny": "a reduced-width Labeler (official keys, torch_reference.LabelerRef)"}
DEEPLAB_MODULES = {"deeplab_v1": "models.SegNet.DeepLab_LargeFOV",
                   "deeplab_v2": "models.SegNet.DeepLab_ASPP",
                   "vgg_tiny": "a reduced-width DeepLab-LargeFOV (official keys, torch_reference.DeepLabV1Ref)"}


class ExportError(Exception):
    """Printed as `bana export-torch: error: ...`, exit status 2."""


def inspect_workdir(workdir) -> tuple[str, dict]:
    """('labeler' | 'deeplab', the run's model config) of a stage-1 or stage-3 workdir.

    Raises ExportError naming what is missing or which architecture has no official module."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise ExportError(f"--workdir={workdir}: no such directory")
    try:
        info = artifacts.model_info(workdir)
        if info["kind"] == "labeler":
            artifacts.weights_path(workdir, info)
    except FileNotFoundError as err:
        raise ExportError(str(err)) from None
    kind, model = info["kind"], info["model"]
    modules = LABELER_MODULES if kind == "labeler" else DEEPLAB_MODULES
    if kind == "deeplab" and not (workdir / artifacts.MODEL_DIR).is_dir() and not any(
            p.name.isdigit() for p in (workdir / "checkpoints").glob("*")):
        raise ExportError(f"{workdir} has the DeepLab's architecture but no trained weights "
                          f"({artifacts.MODEL_DIR}/ or checkpoints/<step>/): run bana stage3 first")
    name = model.get("name")
    if name not in modules:
        raise ExportError(f"{workdir}: model.name={name!r} has no official PyTorch module (exportable "
                          f"{kind}s: {sorted(modules)})")
    if model.get("vgg_norm", "none") != "none":
        raise ExportError(f"{workdir}: model.vgg_norm={model['vgg_norm']!r}: the official VGG has no "
                          "BatchNorm, so its modules cannot load this network")
    if kind == "labeler" and int(model.get("fc6_dilation", 1)) != 1:
        raise ExportError(f"{workdir}: model.fc6_dilation={model['fc6_dilation']}: the official Labeler's "
                          "fc6 has dilation 1")
    return kind, model


def load_model(workdir, kind: str):
    if kind == "labeler":
        return artifacts.load_model(workdir, "labeler")

    return load_trained_deeplab(workdir)


def official_state_dict(model) -> dict[str, np.ndarray]:
    """`torch_state_dict(model)` plus what `strict=True` also wants: every BatchNorm's
    `num_batches_tracked` counter (0: the official code never reads it; momentum is fixed)."""
    sd = torch_state_dict(model)
    for key in [k for k in sd if k.endswith(".running_mean")]:
        sd[key[: -len("running_mean")] + "num_batches_tracked"] = np.zeros((), np.int64)
    return sd


def write_state_dict(state_dict: dict[str, np.ndarray], path) -> Path:
    """`torch.save(state_dict)` to `path` atomically: a temporary file beside it, then a rename."""
    try:
        import torch
    except ImportError:
        raise ExportError("writing a .pth needs PyTorch: pip install 'bana-jax[torch]'") from None
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}  # own, writable copies
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(tensors, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def export(workdir, out=None) -> tuple[Path, str]:
    """Writes the trained network of `workdir` to `out` (default RUN/<model name>.pth).

    Returns (path, the module that loads it)."""
    kind, model_cfg = inspect_workdir(workdir)
    name = model_cfg["name"]
    default = "labeler.pth" if kind == "labeler" else f"{name}.pth"
    path = Path(out) if out else Path(workdir) / default
    if path.is_dir():
        raise ExportError(f"--out={path} is a directory; give a file name (e.g. {path / default})")
    sd = official_state_dict(load_model(workdir, kind))
    module = (LABELER_MODULES if kind == "labeler" else DEEPLAB_MODULES)[name]
    return write_state_dict(sd, path), module


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bana export-torch", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a finished bana stage1 or stage3 run")
    p.add_argument("--out", default=None, help="output .pth (default: WORKDIR/<architecture>.pth)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        path, module = export(args.workdir, args.out)
    except (ExportError, FileNotFoundError, ValueError) as err:
        print(f"bana export-torch: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({module}; load_state_dict(torch.load(path), strict=True))")
    return 0


if __name__ == "__main__":
    sys.exit(main())

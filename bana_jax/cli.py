"""The `bana` command line.

    bana SUBCOMMAND --config=CONFIG[:ARG] --workdir=DIR [--config.group.field=VALUE ...] [--shrink]

CONFIG is a path or the name of a config shipped with the package (`voc/stage1.py`, as in configs/).

Subcommands dispatch to `main(config, workdir)` in their module:

    demo           bana_jax.demo          whole pipeline on synthetic data (CPU, minutes)
    stage1         bana_jax.stage1        train the BAP classification network
    stage2         bana_jax.stage2        pseudo labels Y_crf / Y_ret from a stage-1 run
    stage3         bana_jax.stage3        train DeepLab with the noise-aware loss
    evaluate       bana_jax.evaluate      score a stage-3 checkpoint (mIoU, CRF, multi-scale)
    evaluate-cams  bana_jax.evaluate_cams CAM precision / box classification of a stage-1 run
    compare-torch  bana_jax.compare_torch compare with the official PyTorch code / checkpoints
                   (its own flags: --arch {labeler,deeplab_v1,deeplab_v2} --checkpoint FILE.pt)
    prepare        bana_jax.prepare       write data.* as tfds records into --workdir
                   (then --config.data.source=tfds --config.data.prepared_dir=WORKDIR)
    export-torch   bana_jax.export_torch  a trained labeler / DeepLab as an official PyTorch state dict
                   (its own flags: --workdir RUN [--out FILE.pth])

`--config.a.b=v` (or `--config.a.b v`) sets a field, parsed by ml_collections.config_flags with the
field's type (booleans: true/false; tuples: `(1.0,0.5)` or `1.0,0.5`, and a tuple field given twice
takes both values). Unknown fields and wrong types fail before anything runs. `--shrink` sizes the
run for a quick local try; `--print-config` prints the resolved config and exits.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from bana_jax import io as bio
from bana_jax.config import (
    ConfigError,
    load_config,
    override,
    shrink_config,
    validate_config,
    workdir_config_changes,
)
from bana_jax.data.common import DataError

SUBCOMMANDS = {
    # name: (module, help)
    "demo": ("bana_jax.demo", "run the whole method on the embedded synthetic dataset"),
    "stage1": ("bana_jax.stage1", "train the stage-1 classification network (BAP)"),
    "stage2": ("bana_jax.stage2", "generate pseudo labels (Y_crf, Y_ret) from a stage-1 run"),
    "stage3": ("bana_jax.stage3", "train DeepLab-V1/V2 with the noise-aware loss"),
    "evaluate": ("bana_jax.evaluate", "evaluate a segmentation checkpoint (mIoU)"),
    "evaluate-cams": ("bana_jax.evaluate_cams",
                      "CAM precision and box classification accuracy of a stage-1 run"),
    "compare-torch": ("bana_jax.compare_torch",
                      "compare against the official PyTorch implementation"),
    "prepare": ("bana_jax.prepare",
                "write the dataset of data.* as tfds array_record files (read with data.source=tfds)"),
    "export-torch": ("bana_jax.export_torch",
                     "write a trained labeler / DeepLab under the official PyTorch key names"),
}
# Subcommands with their own flags and no config: argv goes to their main(argv).
OWN_FLAGS = ("compare-torch", "export-torch")

DEFAULT_CONFIGS = {"demo": "demo/demo.py"}
DEFAULT_WORKDIRS = {"demo": "bana_demo"}
# Commands that resume work on a workdir and keep its config.json: a re-run must match it.
CHECKED_WORKDIRS = ("stage1", "stage2", "stage3")


class CliError(Exception):
    """A usage error: printed as `bana: error: ...`, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bana",
        description="BANA (box-supervised semantic segmentation, CVPR 2021) in JAX.",
        epilog="Config fields: --config.GROUP.FIELD=VALUE, groups data, model, optim, train, "
               "loss, pseudo, crf, eval (see bana_jax/config.py).")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    sub.required = True
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(
            name, help=help_text, description=f"{help_text} ({module}.main)",
            epilog="Override any config field with --config.GROUP.FIELD=VALUE, e.g. "
                   "--config.train.num_steps=100 --config.data.batch_size=8.")
        default_config = DEFAULT_CONFIGS.get(name)
        p.add_argument("--config", default=default_config, required=default_config is None,
                       metavar="CONFIG[:ARG]",
                       help="config file defining get_config(): a path or a packaged name "
                            "(e.g. voc/stage1.py)"
                            + (f" (default: {default_config})" if default_config else ""))
        default_workdir = DEFAULT_WORKDIRS.get(name)
        p.add_argument("--workdir", default=default_workdir, required=default_workdir is None,
                       help="run directory (checkpoints, logs, outputs)"
                            + (f" (default: ./{default_workdir})" if default_workdir else ""))
        p.add_argument("--shrink", action="store_true",
                       help="shrink the config for a quick local run (few steps, tiny batches)")
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved config and exit")
        if name in CHECKED_WORKDIRS:
            p.add_argument("--force", action="store_true",
                           help="resume on a workdir whose config.json differs from this config in "
                                "fields that change the result (default: stop and list them)")
    return parser


def resolve_config(config: str, overrides: Sequence[str], shrink: bool):
    """Loads `config` (path or name), applies the `--config.a.b=v` arguments `overrides`, shrinks and
    validates (a ConfigError names the bad field)."""
    config = override(load_config(config), overrides)
    if shrink:
        config = shrink_config(config)
    return validate_config(config)


def resolve_command(command: str) -> Callable:
    """`main(config, workdir)` of the subcommand's module; CliError if it is not there yet."""
    module_name, _ = SUBCOMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise  # the module exists but one of its imports is missing: a real error
        raise CliError(f"'bana {command}' is not implemented yet: module {module_name} does "
                       "not exist") from None
    main_fn = getattr(module, "main", None)
    if not callable(main_fn):
        raise CliError(f"'bana {command}' is not implemented yet: {module_name}.main is missing")
    return main_fn


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in OWN_FLAGS:
        return importlib.import_module(SUBCOMMANDS[argv[0]][0]).main(argv[1:])
    # Exits with status 2 on usage errors, 0 on --help; the rest are config overrides.
    args, overrides = build_parser().parse_known_args(argv)

    try:
        config = resolve_config(args.config, overrides, args.shrink)
    except ConfigError as err:
        print(f"bana {args.command}: error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config)
        return 0
    try:
        command_main = resolve_command(args.command)
    except CliError as err:
        print(f"bana: error: {err}", file=sys.stderr)
        return 2
    stored = Path(args.workdir) / "config.json"
    if args.command in CHECKED_WORKDIRS and not args.force and stored.is_file():
        changes = workdir_config_changes(config, stored.read_text(), args.command)
        if changes:
            print(f"bana {args.command}: error: {args.workdir} holds a run with another config "
                  f"({stored}); these fields differ:\n  " + "\n  ".join(changes)
                  + "\nUse a new --workdir to start over, or --force to resume with this config.",
                  file=sys.stderr)
            return 2
    try:
        bio.check_writable(Path(args.workdir))
    except OSError as err:
        print(f"bana {args.command}: error: cannot write to --workdir={args.workdir}: {err}", file=sys.stderr)
        return 2

    # force: importing orbax (absl) has already configured the root logger at WARNING.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO lines
    import jax  # heavy: only once the config is valid, so a bad one fails at once

    # The partitionable threefry lowering compiles far slower on the CPU (seconds per random op);
    # the classic one is just as independent of the sharding, so results do not change with it.
    jax.config.update("jax_threefry_partitionable", False)
    from bana_jax.train.mesh import maybe_initialize_distributed  # imports jax, see above
    maybe_initialize_distributed()  # before anything touches the devices
    # The demo runs three stages from one top-level config: --shrink applies to all of them.
    extra = {"shrink": args.shrink} if args.command == "demo" else {}
    try:
        result = command_main(config, args.workdir, **extra)
    except ConfigError as err:  # a setting that could only be checked once the run started
        print(f"bana {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (DataError, OSError, FloatingPointError) as err:  # bad files, disks, a diverged loss
        print(f"bana {args.command}: error: {err}", file=sys.stderr)
        return 1
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())

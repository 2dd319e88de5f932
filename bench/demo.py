"""`bana demo` in full: does its DeepLab beat box-fill on the validation scenes, for several seeds?

    python bench/demo.py [--seeds 0,1,2] [--workdir DIR] [--margin 10]

Each seed is one complete `bana demo --config.train.seed=SEED` in a fresh subprocess (so the
wall time includes start-up and compilation, as a user sees it), in DIR/seed<SEED> (default: a
temporary folder). A finished workdir is resumed, not rerun: point --workdir at an earlier run to
re-check its summaries. Prints one line per seed (DeepLab and box-fill mIoU on val, the margin, the
weakest class, seconds) and exits 1 unless every seed has DeepLab >= box-fill + MARGIN with every
class above 0 IoU (issue 16's bar for the demo). This is the check the shrunken test run cannot
make (it trains too little), kept out of the timed test suite.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_demo(workdir: Path, seed: int) -> tuple[dict, float]:
    """`bana demo` on `workdir` with `train.seed=seed`; its demo_summary.json and the wall seconds."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "bana_jax.cli", "demo", "--workdir", str(workdir),
               f"--config.train.seed={seed}", "--config.train.progress_bar=false"]
    subprocess.run(command, check=True, cwd=REPO)
    return json.loads((workdir / "demo_summary.json").read_text()), time.perf_counter() - start


def verdict(summary: dict, margin: float) -> tuple[bool, str]:
    """Whether `summary` meets the bar, and a one-line account of it."""
    deeplab, fill = summary["miou"]["deeplab"], summary["miou"]["box_fill_val"]
    per_class = {name: scores["deeplab"] for name, scores in summary["per_class_val"].items()}
    weakest = min(per_class, key=lambda name: -1.0 if per_class[name] is None else per_class[name])
    weakest_iou = per_class[weakest]
    ok = deeplab >= fill + margin and all(iou is not None and iou > 0 for iou in per_class.values())
    iou_text = "n/a" if weakest_iou is None else f"{weakest_iou:.1f}"
    return ok, (f"DeepLab {deeplab:.1f}  box-fill {fill:.1f}  margin {deeplab - fill:+.1f}  "
                f"weakest class {weakest} {iou_text}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated train.seed values")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the seed<N> workdirs")
    parser.add_argument("--margin", type=float, default=10.0, help="mIoU points above box-fill")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    parent = args.workdir or Path(tempfile.mkdtemp(prefix="bana_bench_demo_"))
    all_ok = True
    for seed in seeds:
        summary, wall = run_demo(parent / f"seed{seed}", seed)
        ok, line = verdict(summary, args.margin)
        all_ok &= ok
        seconds = "  ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items())
        print(f"seed {seed}: {'ok  ' if ok else 'FAIL'} {line}  | seconds: {seconds}, wall {wall:.0f}",
              flush=True)
    print(f"{'all seeds meet' if all_ok else 'NOT all seeds meet'} DeepLab >= box-fill + "
          f"{args.margin:g} with every class > 0 IoU ({parent})")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())

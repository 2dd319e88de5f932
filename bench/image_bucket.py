"""How much `pseudo.image_bucket` changes the pseudo labels, and what it saves in compilations.

    bana stage2 ... --workdir=EXACT                                   # pseudo.image_bucket = 0
    bana stage2 ... --workdir=BUCKETED --config.pseudo.image_bucket=128
    python bench/image_bucket.py EXACT/pseudo_labels BUCKETED/pseudo_labels

Compares the Y_crf and Y_ret PNGs of the images both runs labelled (pixel agreement, overall and
the worst image) and prints each run's backbone compilations, distinct image sizes, mIoU and wall
time per image from its summary.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bana_jax import io as bio  # noqa: E402


def agreement(exact_dir: Path, bucketed_dir: Path, kind: str) -> tuple[int, float, float, str]:
    """(images, overall pixel agreement, worst image's agreement, worst image id)."""
    same = total = 0
    worst = (1.0, "")
    ids = sorted(p.stem for p in (bucketed_dir / kind).glob("*.png") if (exact_dir / kind / p.name).exists())
    if not ids:
        raise SystemExit(f"no {kind} PNG is in both {exact_dir} and {bucketed_dir}")
    for image_id in ids:
        a = bio.read_label_png(exact_dir / kind / f"{image_id}.png")
        b = bio.read_label_png(bucketed_dir / kind / f"{image_id}.png")
        if a.shape != b.shape:
            raise SystemExit(f"{kind}/{image_id}.png: shapes differ, {a.shape} vs {b.shape}")
        equal = int((a == b).sum())
        same, total = same + equal, total + a.size
        worst = min(worst, (equal / a.size, image_id))
    return len(ids), same / total, worst[0], worst[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exact", type=Path, help="pseudo_labels folder of the exact run")
    parser.add_argument("bucketed", type=Path, help="pseudo_labels folder of the bucketed run")
    args = parser.parse_args()
    for kind in ("Y_crf", "Y_ret"):
        n, overall, worst, worst_id = agreement(args.exact, args.bucketed, kind)
        print(f"{kind}: {n} images, pixel agreement {100 * overall:.2f}%, worst {100 * worst:.2f}% ({worst_id})")
    print("| run | image_bucket | images | sizes | backbone compilations | mIoU Y_crf | mIoU Y_ret | s/image (wall) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, folder in (("exact", args.exact), ("bucketed", args.bucketed)):
        summary = json.loads((folder / "summary.json").read_text())
        miou = summary.get("miou", {})
        fmt = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
        print(f"| {name} | {summary['settings'].get('image_bucket', 0)} | {summary['images']} "
              f"| {summary['backbone_image_sizes']} | {summary.get('backbone_compilations', 'n/a')} "
              f"| {fmt(miou.get('y_crf'))} | {fmt(miou.get('y_ret'))} "
              f"| {fmt(summary['seconds_per_image']['wall'])} |")


if __name__ == "__main__":
    main()

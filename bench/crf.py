"""crf_ext vs pydensecrf on real photos: BANA's stage-2 call, alternating in one process.

    python bench/crf.py [--reps 20] [--sizes 500x375,1000x750] [--labels 3,21] [--skip ...]

Both sides include the unary (-log(clip(p, 1e-5))) and every copy; 10 mean-field iterations with
BANA's parameters [4, 55, 3, 3, 3]. Prints the instruction-set level that ran (crf_ext.isa; set
CRF_EXT_ISA to force a lower one), medians, the ratio of medians, where the time of one call goes
(lattice build, then per iteration splat / blur / slice / softmax), every level this installation
has against the highest (`native` too when built with -Ccmake.define.CRF_EXT_LEVELS="avx512;native"),
the lattice build alone, peak memory growth per call (each in a fresh subprocess) and
dense_crf_batch scaling.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO.parent / "shared" / "data" / "coco128" / "train2017"
PHOTO_NAMES = ["000000000009.jpg", "000000000025.jpg", "000000000030.jpg"]
BANA = dict(bi_w=4.0, bi_xy_std=55.0, bi_rgb_std=3.0, pos_w=3.0, pos_xy_std=3.0)


def load_photo(name: str, size: tuple[int, int]) -> np.ndarray:
    with Image.open(PHOTOS / name) as im:
        return np.array(im.convert("RGB").resize(size, Image.BILINEAR))


def smooth_probs(n_labels: int, height: int, width: int, seed: int) -> np.ndarray:
    """Softmax of a coarse random field, bilinearly upsampled: CAM-like, smooth unaries."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(scale=3.0, size=(n_labels, height // 16 + 2, width // 16 + 2)).astype(np.float32)
    ys = np.linspace(0, coarse.shape[1] - 1, height)
    xs = np.linspace(0, coarse.shape[2] - 1, width)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, coarse.shape[1] - 1), np.minimum(x0 + 1, coarse.shape[2] - 1)
    wy, wx = (ys - y0)[:, None], (xs - x0)[None, :]
    logits = (coarse[:, y0][:, :, x0] * (1 - wy) * (1 - wx) + coarse[:, y0][:, :, x1] * (1 - wy) * wx
              + coarse[:, y1][:, :, x0] * wy * (1 - wx) + coarse[:, y1][:, :, x1] * wy * wx)
    probs = np.exp(logits - logits.max(0))
    return (probs / probs.sum(0)).astype(np.float32)


def pydensecrf_call(image: np.ndarray, probs: np.ndarray) -> np.ndarray:
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    n_labels, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=BANA["pos_xy_std"], compat=BANA["pos_w"])
    crf.addPairwiseBilateral(sxy=BANA["bi_xy_std"], srgb=BANA["bi_rgb_std"], rgbim=np.ascontiguousarray(image),
                             compat=BANA["bi_w"])
    return np.array(crf.inference(10)).reshape(n_labels, height, width)


def ours_call(image: np.ndarray, probs: np.ndarray, threads: int) -> np.ndarray:
    import crf_ext

    return crf_ext.dense_crf(image, probs, n_iter=10, num_threads=threads, **BANA)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def bench_speed(sizes, label_counts, reps) -> list[str]:
    rows = ["| size | C | pydensecrf | crf_ext 1 thread | ratio | crf_ext 2 threads | ratio |",
            "|---|---|---|---|---|---|---|"]
    for size in sizes:
        images = [load_photo(name, size) for name in PHOTO_NAMES]
        for n_labels in label_counts:
            probs = [smooth_probs(n_labels, size[1], size[0], seed=i) for i in range(len(images))]
            ref, one, two = [], [], []
            for rep in range(reps):
                i = rep % len(images)
                ref.append(timed(pydensecrf_call, images[i], probs[i]))
                one.append(timed(ours_call, images[i], probs[i], 1))
                two.append(timed(ours_call, images[i], probs[i], 2))
            m_ref, m_one, m_two = (statistics.median(t) for t in (ref, one, two))
            rows.append(f"| {size[0]}x{size[1]} | {n_labels} | {m_ref:.3f} s | {m_one:.3f} s | {m_ref / m_one:.2f}x "
                        f"| {m_two:.3f} s | {m_ref / m_two:.2f}x |")
            print(rows[-1], flush=True)
    return rows


PHASES = ("splat", "blur", "slice", "softmax")


def bench_phases(sizes, label_counts, reps) -> list[str]:
    """Where the time of one dense_crf call goes: the build (unary, both lattices), then per
    mean-field iteration each phase (wall-clock, medians over reps; slice includes the compatibility)."""
    import crf_ext

    rows = [f"| size | C | threads | total | build | per iteration: {' | '.join(PHASES)} |",
            "|---|---|---|---|---|" + "---|" * len(PHASES)]
    for size in sizes:
        images = [load_photo(name, size) for name in PHOTO_NAMES]
        for n_labels in label_counts:
            probs = [smooth_probs(n_labels, size[1], size[0], seed=i) for i in range(len(images))]
            for threads in (1, 2):
                samples = {key: [] for key in ("total", "build") + PHASES}
                for rep in range(reps):
                    i = rep % len(images)
                    start = time.perf_counter()
                    _, seconds = crf_ext._core.dense_crf_profile(images[i], probs[i], n_iter=10, num_threads=threads,
                                                                 **BANA)
                    samples["total"].append(time.perf_counter() - start)
                    for key, value in seconds.items():
                        samples[key].append(value)
                ms = {key: statistics.median(values) * 1e3 for key, values in samples.items()}
                per_iteration = " | ".join(f"{ms[phase] / 10:.1f} ms" for phase in PHASES)
                rows.append(f"| {size[0]}x{size[1]} | {n_labels} | {threads} | {ms['total']:.0f} ms "
                            f"| {ms['build']:.0f} ms | {per_iteration} |")
                print(rows[-1], flush=True)
    return rows


def bench_levels(sizes, label_counts, reps) -> list[str]:
    """Each instruction-set level this installation has and this CPU runs, alternating in one
    process, against the highest (native when built): 2 threads, medians."""
    from crf_ext import _isa

    levels = _isa.runnable_levels()
    modules = {level: _isa.load(level) for level in levels}
    rows = ["| size | C | " + " | ".join(levels) + " |", "|---|---|" + "---|" * len(levels)]
    for size in sizes:
        images = [load_photo(name, size) for name in PHOTO_NAMES]
        for n_labels in label_counts:
            probs = [smooth_probs(n_labels, size[1], size[0], seed=i) for i in range(len(images))]
            times = {level: [] for level in levels}
            for rep in range(reps):
                i = rep % len(images)
                for level in levels:
                    params = dict(BANA, n_iter=10, num_threads=2)
                    times[level].append(timed(lambda: modules[level].dense_crf(images[i], probs[i], **params)))
            medians = {level: statistics.median(t) for level, t in times.items()}
            best = medians[levels[0]]
            cells = " | ".join(f"{medians[level]:.3f} s ({medians[level] / best:.2f})" for level in levels)
            rows.append(f"| {size[0]}x{size[1]} | {n_labels} | {cells} |")
            print(rows[-1], flush=True)
    return rows


def bench_lattice(reps) -> list[str]:
    """The bilateral (d=5) lattice build alone: pydensecrf's addPairwiseBilateral vs ours."""
    import pydensecrf.densecrf as dcrf

    from crf_ext import _core

    rows = ["| size | pydensecrf addPairwiseBilateral | crf_ext lattice 1 thread | ratio | 2 threads | ratio |",
            "|---|---|---|---|---|---|"]
    size = (500, 375)
    images = [load_photo(name, size) for name in PHOTO_NAMES]
    ref, one, two = [], [], []
    for rep in range(reps):
        image = images[rep % len(images)]
        crf = dcrf.DenseCRF2D(size[0], size[1], 3)
        start = time.perf_counter()
        crf.addPairwiseBilateral(sxy=55, srgb=3, rgbim=image, compat=4)
        ref.append(time.perf_counter() - start)
        ys, xs = np.mgrid[0:size[1], 0:size[0]].astype(np.float32)
        for threads, out in ((1, one), (2, two)):
            start = time.perf_counter()
            features = np.concatenate([np.stack([xs / np.float32(55), ys / np.float32(55)], -1),
                                       image.astype(np.float32) / np.float32(3)], -1).reshape(-1, 5)
            _core.Lattice(features, threads)
            out.append(time.perf_counter() - start)
    m_ref, m_one, m_two = (statistics.median(t) for t in (ref, one, two))
    rows.append(f"| {size[0]}x{size[1]} | {m_ref * 1e3:.0f} ms | {m_one * 1e3:.0f} ms | {m_one / m_ref:.2f} "
                f"| {m_two * 1e3:.0f} ms | {m_two / m_ref:.2f} |")
    print(rows[-1], flush=True)
    return rows


def peak_growth_mib(impl: str, size: tuple[int, int], n_labels: int, threads: int = 2) -> float:
    """Peak RSS growth of one call, in a fresh interpreter, in MiB.

    Making the inputs has a higher peak than some calls, so ru_maxrss would read 0: the kernel's
    high-water mark (VmHWM) is reset after the inputs exist (clear_refs 5) and read after the call.
    """
    code = (
        "import sys; sys.path.insert(0, %r); import bench.crf as b; import crf_ext, pydensecrf.densecrf\n"
        "img = b.load_photo(b.PHOTO_NAMES[0], %r); p = b.smooth_probs(%d, %d, %d, 0)\n"
        "kib = lambda key: int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1])\n"
        "open('/proc/self/clear_refs', 'w').write('5'); base = kib('VmRSS:')\n"
        "(b.pydensecrf_call(img, p) if %r == 'pydensecrf' else b.ours_call(img, p, %d))\n"
        "print((kib('VmHWM:') - base) / 1024)\n"
    ) % (str(REPO), size, n_labels, size[1], size[0], impl, threads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_memory(sizes, label_counts) -> list[str]:
    rows = ["| size | C | pydensecrf peak growth | crf_ext, 1 thread | crf_ext, 2 threads |", "|---|---|---|---|---|"]
    for size in sizes:
        for n_labels in label_counts:
            ref = peak_growth_mib("pydensecrf", size, n_labels)
            one, two = (peak_growth_mib("crf_ext", size, n_labels, threads) for threads in (1, 2))
            rows.append(f"| {size[0]}x{size[1]} | {n_labels} | +{ref:.0f} MiB | +{one:.0f} MiB | +{two:.0f} MiB |")
            print(rows[-1], flush=True)
    return rows


def bench_batch(reps) -> list[str]:
    import crf_ext

    size = (500, 375)
    images = [load_photo(name, size) for name in PHOTO_NAMES] * 2
    probs = [smooth_probs(3, size[1], size[0], seed=i) for i in range(len(images))]
    rows = ["| dense_crf_batch, 6 images 500x375 C=3 | 1 thread | 2 threads | speed-up |", "|---|---|---|---|"]
    times = {1: [], 2: []}
    for _ in range(max(3, reps // 4)):
        for threads in (1, 2):
            start = time.perf_counter()
            crf_ext.dense_crf_batch(images, probs, n_iter=10, num_threads=threads, **BANA)
            times[threads].append(time.perf_counter() - start)
    one, two = statistics.median(times[1]), statistics.median(times[2])
    rows.append(f"| | {one:.3f} s | {two:.3f} s | {one / two:.2f}x |")
    print(rows[-1], flush=True)
    return rows


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--sizes", default="500x375,1000x750")
    parser.add_argument("--labels", default="3,21")
    parser.add_argument("--skip", default="", help="comma list of: speed,phases,levels,lattice,memory,batch")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    label_counts = [int(c) for c in args.labels.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    import crf_ext

    print(f"# {time.strftime('%Y-%m-%d')} {cpu_name()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f}, reps {args.reps}", flush=True)
    print(f"# crf_ext {crf_ext.__file__}: ran level {crf_ext.isa} (runnable here: {', '.join(crf_ext.isa_levels())})",
          flush=True)
    if "speed" not in skip:
        bench_speed(sizes, label_counts, args.reps)
    if "phases" not in skip:
        bench_phases(sizes, label_counts, max(3, args.reps // 2))
    if "levels" not in skip:
        bench_levels(sizes, label_counts, args.reps)
    if "lattice" not in skip:
        bench_lattice(args.reps)
    if "memory" not in skip:
        bench_memory(sizes, label_counts)
    if "batch" not in skip:
        bench_batch(args.reps)
    print(f"# load after: {os.getloadavg()[0]:.2f}; max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")


if __name__ == "__main__":
    main()

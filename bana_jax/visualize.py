"""Colour pictures of pseudo labels and predictions: palette overlays, boxes, unary heat maps, one
panel per image, an `index.html` that shows them (stage 2 with `pseudo.save_visualisations`, and the
demo), and training curves as inline SVG (the demo's report).

All images are uint8 RGB `(H, W, 3)`; label maps uint8 class ids `(H, W)` (255 = ignore). Boxes are
raw-sample boxes: inclusive pixel `[x_min, y_min, x_max, y_max]`.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, PngImagePlugin

from bana_jax.io import atomic_write, voc_palette, write_text

_SEPARATOR = 4  # white pixels between the tiles of a panel
_TITLES_KEY = "bana:titles"  # PNG text chunk holding a panel's column titles (JSON list)


def colorize(label) -> np.ndarray:
    """Class ids `(H, W)` -> VOC palette colours `(H, W, 3)` uint8."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be (H, W), got shape {label.shape}")
    return voc_palette()[label.astype(np.uint8)]


def overlay(image, label, alpha: float = 0.6) -> np.ndarray:
    """The photo with every non-background pixel tinted by its class colour (255 grey)."""
    image = _check_image(image)
    label = np.asarray(label)
    if label.shape != image.shape[:2]:
        raise ValueError(f"label shape {label.shape} does not match the image {image.shape[:2]}")
    tinted = (1 - alpha) * image + alpha * colorize(label)
    return np.where((label > 0)[..., None], tinted, image).round().astype(np.uint8)


def heatmap(values) -> np.ndarray:
    """Values `(H, W)` in [0, 1] -> a black-red-yellow-white ramp `(H, W, 3)` uint8."""
    v = np.clip(np.nan_to_num(np.asarray(values, np.float32)), 0.0, 1.0)
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], -1)
    return (255 * rgb).round().astype(np.uint8)


def draw_boxes(image, boxes, box_labels, thickness: int = 2) -> np.ndarray:
    """Box outlines in their class colours (inclusive pixel boxes, clipped to the image)."""
    out = _check_image(image).copy()
    height, width = out.shape[:2]
    palette = voc_palette()
    for (x0, y0, x1, y1), cls in zip(np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(box_labels)):
        x0, x1 = (int(np.clip(np.floor(v), 0, width - 1)) for v in (x0, x1))
        y0, y1 = (int(np.clip(np.floor(v), 0, height - 1)) for v in (y0, y1))
        colour = palette[int(cls) % 256]
        t = thickness
        out[y0:min(y0 + t, y1 + 1), x0:x1 + 1] = colour
        out[max(y1 - t + 1, y0):y1 + 1, x0:x1 + 1] = colour
        out[y0:y1 + 1, x0:min(x0 + t, x1 + 1)] = colour
        out[y0:y1 + 1, max(x1 - t + 1, x0):x1 + 1] = colour
    return out


def mark(image, mask) -> np.ndarray:
    """Hatch the pixels of `mask` `(H, W)` with black/white diagonal stripes (unreliable pixels)."""
    out = _check_image(image).copy()
    mask = np.asarray(mask, bool)
    yy, xx = np.mgrid[0:mask.shape[0], 0:mask.shape[1]]
    stripes = ((yy + xx) // 3) % 2 == 0
    out[mask & stripes] = 255
    out[mask & ~stripes] = 0
    return out


def panel(tiles: Sequence[np.ndarray]) -> np.ndarray:
    """Tiles of one height side by side, separated by white columns."""
    tiles = [_check_image(t) for t in tiles]
    if len({t.shape[0] for t in tiles}) != 1:
        raise ValueError(f"tiles must share a height, got {[t.shape for t in tiles]}")
    gap = np.full((tiles[0].shape[0], _SEPARATOR, 3), 255, np.uint8)
    parts = [tiles[0]]
    for tile in tiles[1:]:
        parts += [gap, tile]
    return np.concatenate(parts, axis=1)


PANEL_COLUMNS = ("image + boxes", "u_0", "max_c u_c", "Y_crf", "Y_ret (hatched: Y_crf != Y_ret)",
                 "ground truth")


def pseudo_label_panel(image, boxes, box_labels, y_crf, y_ret, *, bg_unary=None, class_unary_max=None,
                       label=None) -> tuple[np.ndarray, list[str]]:
    """One image's stage-2 picture (supplement Fig. 2): image with boxes, u_0, max_c u_c, Y_crf,
    Y_ret with the unreliable pixels hatched, ground truth. Missing maps are left out.
    Returns the panel `(H, W', 3)` and the column titles."""
    image = _check_image(image)
    tiles, titles = [draw_boxes(image, boxes, box_labels)], [PANEL_COLUMNS[0]]
    if bg_unary is not None:
        tiles.append(heatmap(bg_unary))
        titles.append(PANEL_COLUMNS[1])
    if class_unary_max is not None:
        tiles.append(heatmap(class_unary_max))
        titles.append(PANEL_COLUMNS[2])
    y_crf, y_ret = np.asarray(y_crf), np.asarray(y_ret)
    tiles += [overlay(image, y_crf), mark(overlay(image, y_ret), y_crf != y_ret)]
    titles += [PANEL_COLUMNS[3], PANEL_COLUMNS[4]]
    if label is not None:
        tiles.append(overlay(image, label))
        titles.append(PANEL_COLUMNS[5])
    return panel(tiles), titles


PREDICTION_COLUMNS = ("image", "ground truth", "prediction")


def prediction_panel(image, label, prediction) -> tuple[np.ndarray, list[str]]:
    """One evaluated image: the image, its ground truth and a prediction, both in palette colours
    (the objects' own colours would blend with an overlay's). Returns the panel `(H, W', 3)` and the
    column titles."""
    image = _check_image(image)
    return panel([image, colorize(label), colorize(prediction)]), list(PREDICTION_COLUMNS)


def svg_curve(points: Sequence[tuple[float, float]], *, title: str, x_label: str = "step",
              width: int = 420, height: int = 180) -> str:
    """A line plot of `(x, y)` points as an inline `<svg>` element (no plotting library).

    The axes span the data's range (y from its min to its max, labelled at both ends); the curve
    is one `<polyline>` with a vertex per point, in the order given.
    """
    if not points:
        raise ValueError(f"svg_curve({title!r}) needs at least one point")
    xs = np.array([p[0] for p in points], np.float64)
    ys = np.array([p[1] for p in points], np.float64)
    left, right, top, bottom = 48, 10, 22, 30  # margins: y labels, title, x labels
    plot_w, plot_h = width - left - right, height - top - bottom

    def scale(values, lo, hi, size):
        span = hi - lo
        return np.full_like(values, size / 2) if span <= 0 else (values - lo) / span * size

    px = left + scale(xs, xs.min(), xs.max(), plot_w)
    py = top + plot_h - scale(ys, ys.min(), ys.max(), plot_h)
    vertices = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(px, py))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'role="img" aria-label="{html.escape(title)}">'
            f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>'
            + _svg_text(left + plot_w / 2, 14, title, "middle")
            + _svg_text(left - 4, top + 10, f"{ys.max():.3g}")
            + _svg_text(left - 4, top + plot_h, f"{ys.min():.3g}")
            + _svg_text(left, height - 8, f"{x_label} {xs.min():g}", "start")
            + _svg_text(left + plot_w, height - 8, f"{xs.max():g}")
            + f'<polyline fill="none" stroke="#c03020" stroke-width="1.5" points="{vertices}"/></svg>')


def _svg_text(x: float, y: float, text: str, anchor: str = "end") -> str:
    return f'<text x="{x}" y="{y}" text-anchor="{anchor}" font-size="11">{html.escape(text)}</text>'


def write_png(path, rgb, titles: Sequence[str] | None = None) -> None:
    """An RGB image `(H, W, 3)` as PNG, atomically (temporary name + rename).

    `titles` (a panel's column titles) go into a text chunk of the same file, so a panel always
    carries its own titles, whichever run wrote it (see `read_titles`)."""
    image = Image.fromarray(_check_image(rgb))
    info = None
    if titles is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text(_TITLES_KEY, json.dumps([str(t) for t in titles]))
    atomic_write(Path(path), lambda f: image.save(f, format="PNG", pnginfo=info))


def read_titles(path) -> list[str] | None:
    """The column titles `write_png` stored in a panel, or None (a panel written without them)."""
    # `info` holds the chunks before the pixel data, where PIL writes text chunks: the pixels are
    # not decoded (`image.text` would decode them).
    with Image.open(path) as image:
        text = image.info.get(_TITLES_KEY)
    return None if text is None else [str(t) for t in json.loads(text)]


def write_index(directory, entries: Sequence[dict], title: str = "BANA pseudo labels") -> Path:
    """`directory/index.html` listing panels: entries of `{"id", "file" (relative), "titles",
    optional "note"}`. Written atomically; returns its path."""
    directory = Path(directory)
    rows = []
    for entry in entries:
        heads = " | ".join(html.escape(t) for t in entry.get("titles", ()))
        note = f" &mdash; {html.escape(entry['note'])}" if entry.get("note") else ""
        rows.append(f"<h3>{html.escape(str(entry['id']))}{note}</h3>\n<p>{heads}</p>\n"
                    f"<img src=\"{html.escape(str(entry['file']))}\" alt=\"{html.escape(str(entry['id']))}\">")
    text = (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>\n"
            "<style>body{font-family:sans-serif} img{max-width:100%;image-rendering:pixelated}</style>"
            f"</head>\n<body><h1>{html.escape(title)}</h1>\n" + "\n".join(rows) + "\n</body></html>\n")
    path = directory / "index.html"
    write_text(path, text)
    return path


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    return image

"""On-disk cache of frozen-backbone features, one file per image and view (`model.freeze_backbone`).

    cache = FeatureCache(WORKDIR / "feature_cache", backbone_fingerprint(backbone))
    features = cache.get(view, image_id, image_fingerprint(image))   # None on a miss
    cache.put(view, image_id, image_fingerprint(image), features)

Layout: `DIR/backbone.json` names the backbone the features come from; `DIR/<view>/<id>.<image
hash>.npy` holds one image's features `(h, w, D)` as float16. A cache made by another backbone
(architecture or weights) is emptied when opened; an image whose pixels changed misses (its hash is
in the file name) and its old file is replaced. Files are written under a temporary name and
renamed, so a killed run leaves no partial entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from bana_jax import io as bio

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "backbone.json"
STORED_DTYPE = np.float16


def backbone_fingerprint(backbone: nnx.Module, description: str = "") -> str:
    """A hash of `description` (the architecture, e.g. the model config) and of every weight and
    statistic of the module, with its name and shape."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(description.encode())
    _, state, _ = nnx.split(backbone, nnx.Not(nnx.RngState), ...)
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state)):
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def image_fingerprint(image: np.ndarray) -> str:
    """A short hash of an image's pixels and shape."""
    image = np.ascontiguousarray(image)
    digest = hashlib.blake2b(f"{image.dtype}:{image.shape}".encode(), digest_size=8)
    digest.update(image.tobytes())
    return digest.hexdigest()


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


class FeatureCache:
    """Features of one backbone, by view and image (see the module docstring)."""

    def __init__(self, directory, fingerprint: str):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.hits = self.misses = 0
        marker = self.directory / FINGERPRINT_FILE
        if marker.is_file():
            stored = json.loads(marker.read_text()).get("backbone")
            if stored != fingerprint:
                log.info("feature cache %s was made by another backbone: emptied", self.directory)
                shutil.rmtree(self.directory)
        if not marker.is_file():
            self.directory.mkdir(parents=True, exist_ok=True)
            bio.write_json(marker, {"backbone": fingerprint})

    def _path(self, view: str, image_id: str, image_hash: str) -> Path:
        return self.directory / _safe_name(view) / f"{_safe_name(image_id)}.{image_hash}.npy"

    def get(self, view: str, image_id: str, image_hash: str) -> np.ndarray | None:
        """The cached features `(h, w, D)` (float16, memory-mapped), or None."""
        path = self._path(view, image_id, image_hash)
        if not path.is_file():
            self.misses += 1
            return None
        self.hits += 1
        return np.load(path, mmap_mode="r")

    def put(self, view: str, image_id: str, image_hash: str, features) -> np.ndarray:
        """Stores `features` (as float16) and drops the image's entries for other pixels."""
        path = self._path(view, image_id, image_hash)
        stored = np.asarray(features).astype(STORED_DTYPE)
        bio.atomic_write(path, lambda f: np.save(f, stored))
        prefix = f"{_safe_name(image_id)}."
        for old in path.parent.glob(f"{prefix}*.npy"):
            other_hash = old.name[len(prefix):-len(".npy")]
            if old != path and len(other_hash) == len(image_hash) and "." not in other_hash:
                old.unlink(missing_ok=True)
        return stored

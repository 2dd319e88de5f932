"""Shared test set-up: simulated devices for JAX, the real COCO photos kept in tests/fixtures."""

import os
from pathlib import Path

# Several CPU devices for sharding tests; must be set before JAX initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402

# As the `bana` CLI does (bana_jax.cli): threefry's partitionable lowering compiles far slower on
# the CPU; the classic one gives sharding-independent values too.
jax.config.update("jax_threefry_partitionable", False)

REPO = Path(__file__).resolve().parents[1]
COCO_PHOTOS = REPO / "tests" / "fixtures" / "coco"


@pytest.fixture(scope="session")
def coco_photos() -> Path:
    """tests/fixtures/coco: a few real COCO train2017 photos with their official annotations, in the
    layout of ../shared/data (coco128/, coco_mini/); see tests/fixtures/README.md."""
    assert COCO_PHOTOS.is_dir(), f"test photos not found at {COCO_PHOTOS}"
    return COCO_PHOTOS

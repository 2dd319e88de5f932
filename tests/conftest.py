"""Shared test set-up: simulated devices for JAX, the real-photo data shipped beside the repo."""

import os
from pathlib import Path

# Several CPU devices for sharding tests; must be set before JAX initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402

# As the `bana` CLI does (bana_jax.cli): threefry's partitionable lowering compiles ~6x slower on
# the CPU; the classic one gives sharding-independent values too.
jax.config.update("jax_threefry_partitionable", False)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real COCO photos + annotations); CI has it too, so its absence is a failure."""
    assert SHARED_DATA.is_dir(), f"real test data not found at {SHARED_DATA} (../shared/data/README.md: it lies beside the repository)"
    return SHARED_DATA

"""Data-parallel mesh, shardings and multi-host set-up.

One mesh axis "data" over every device of every process. Batches are split along their leading
axis; parameters and optimizer state are replicated. Under `jax.jit` with these shardings XLA
inserts the gradient all-reduce (and global-batch BatchNorm statistics) itself.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
logger = logging.getLogger("bana_jax.train")

# Environment variables that mean "this process is one of several in a cluster": JAX's own
# coordinator settings, SLURM (multi-task jobs), Open MPI, and Cloud TPU pods.
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_NTASKS",
                "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def cluster_requested(environ: dict[str, str] | None = None) -> bool:
    """True when the environment describes a multi-process job."""
    environ = os.environ if environ is None else environ
    for name in _CLUSTER_ENV:
        value = environ.get(name)
        if not value:
            continue
        if name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
            if int(value) > 1:
                return True
        elif name == "TPU_WORKER_HOSTNAMES":
            if len(value.split(",")) > 1:
                return True
        else:
            return True
    return False


_initialized = False


def maybe_initialize_distributed() -> None:
    """Calls `jax.distributed.initialize()` (once) when the cluster environment asks for it.

    The one caller is the `bana` command line (bana_jax.cli.main), before any stage runs: it must
    come before anything touches the devices, which every stage does before its training loop.
    Code that drives the stages from Python calls it (or `jax.distributed.initialize`) first. JAX autodetects the coordinator, process count
    and id from SLURM / Open MPI / TPU variables, or from JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    """
    global _initialized
    if _initialized or not cluster_requested():
        return
    kwargs = {}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
        if os.environ.get("JAX_NUM_PROCESSES"):
            kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        if os.environ.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    _initialized = True


def is_main_process() -> bool:
    """Only process 0 writes logs, metrics and summaries."""
    return jax.process_index() == 0


def make_data_mesh(devices: list | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh with axis "data" over `devices` (default: all devices of all processes)."""
    if devices is None:
        return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))
    return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def mesh_for_batch(batch_size: int) -> jax.sharding.Mesh:
    """The data mesh over all devices, or, on one process when the batch does not split over
    them (e.g. a `--shrink` run on 8 devices), over the largest count of devices it splits over."""
    devices = jax.devices()
    if batch_size % len(devices) == 0 or jax.process_count() > 1:
        return make_data_mesh()  # multi-host: check_batch_size reports a bad batch size
    usable = max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)
    logger.warning("data.batch_size=%d does not split over %d devices: training on %d of them",
                   batch_size, len(devices), usable)
    return make_data_mesh(devices[:usable])


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis split over "data", other axes whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: jax.sharding.Mesh) -> int:
    """Returns the per-process batch size; raises when the batch does not split evenly."""
    n_devices = mesh.devices.size
    if global_batch % n_devices:
        raise ValueError(
            f"data.batch_size={global_batch} must be divisible by the number of devices "
            f"({n_devices}); pick a multiple of {n_devices}")
    return global_batch // jax.process_count()


def shard_batch(local_batch: dict[str, Any], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Assembles global arrays from this process's slice of the batch.

    Each process passes its own `(B_local, ...)` NumPy arrays; the result is a global
    `(B_local * process_count, ...)` array sharded over "data". With one process this is a
    sharded `device_put`.
    """
    sharding = batch_sharding(mesh)

    def put(x):
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError(f"batch entries need a leading batch axis, got a scalar {x!r}")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, local_batch)


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Places every leaf of `tree` on all devices of the mesh."""
    return jax.device_put(tree, replicated_sharding(mesh))

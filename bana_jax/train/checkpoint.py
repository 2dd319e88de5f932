"""orbax checkpoints of the train state plus the data iterator's position.

Layout: `WORKDIR/checkpoints/<step>/{state,data}`. orbax writes each step to a temporary folder
and renames it when complete, so an interrupted save never looks like a checkpoint. Every process
takes part in a save (orbax coordinates; the primary host writes the JSON item). The data item
holds one iterator state per process, gathered to the primary host.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


def gather_process_states(local_state: Any) -> list[Any]:
    """All processes' JSON-able iterator states, in process order (every process gets the list)."""
    if jax.process_count() == 1:
        return [local_state]
    encoded = np.frombuffer(json.dumps(local_state).encode(), dtype=np.uint8)
    lengths = multihost_utils.process_allgather(np.array([encoded.size], np.int32))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[:encoded.size] = encoded
    everything = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:int(n)]).decode())
            for row, n in zip(everything, np.ravel(lengths))]


class Checkpointer:
    """Periodic saves (keeping the last `keep`), restore of the latest one."""

    def __init__(self, directory: str | Path, keep: int):
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep}")
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: Any | None) -> None:
        items = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            items["data"] = ocp.args.JsonSave({"processes": gather_process_states(data_state)})
        try:  # orbax first waits for the previous save, whose error surfaces here
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as err:  # noqa: BLE001
            self._reraise(err)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any | None]:
        """Returns (state, this process's data state or None).

        `abstract_state` gives shapes, dtypes and shardings (`jax.ShapeDtypeStruct` leaves).
        """
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        has_data = (self.directory / str(step) / "data").exists()
        if has_data:
            items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        data_state = None
        if has_data:
            processes = restored["data"]["processes"]
            if len(processes) != jax.process_count():
                raise ValueError(
                    f"checkpoint {self.directory / str(step)} holds data positions for "
                    f"{len(processes)} processes, this run has {jax.process_count()}")
            data_state = processes[jax.process_index()]
        return restored["state"], data_state

    def _reraise(self, err: Exception):
        raise OSError(f"saving a checkpoint under {self.directory} failed: {err}") from err

    def check_for_errors(self) -> None:
        """Raises the error of a finished background save, naming the folder; cheap."""
        try:
            self.manager.check_for_errors()
        except Exception as err:  # noqa: BLE001 - orbax raises whatever the write raised
            self._reraise(err)

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001
            self._reraise(err)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStruct leaves with the same shardings, as a restore target."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

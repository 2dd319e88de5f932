"""Training logs: a progress bar on a TTY, log lines otherwise, JSONL metrics, TensorBoard.

Only the main process writes. `metrics.jsonl` in the workdir gets one JSON object per logged step
(appended, so a resumed run continues the file, first dropping the records after the step it
resumes from: it logs those steps again). TensorBoard event files are written through
tensorboardX when it is installed and `train.tensorboard` is on (clu's writers import TensorFlow).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Mapping

from tqdm import tqdm

from bana_jax import io as bio

logger = logging.getLogger("bana_jax.train")


def keep_records_until(path: Path, step: int) -> None:
    """Rewrites the JSONL file `path` (atomically, if anything changes) without the records after
    `step` and without a torn line (a run killed while writing)."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    kept = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(record.get("step", 0)) <= step:
            kept.append(line + "\n")
    if "".join(kept) != text:
        bio.write_text(path, "".join(kept))


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}"


class MetricLogger:
    """Writes scalars for `step`; tracks images/s and the ETA between calls."""

    def __init__(self, workdir: str | Path, total_steps: int, initial_step: int, *,
                 enabled: bool = True, tensorboard: bool = False, progress_bar: bool = True,
                 stream=None):
        self.enabled = enabled
        self.total_steps = total_steps
        self._last_step = initial_step
        self._last_time = time.perf_counter()
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        keep_records_until(workdir / "metrics.jsonl", initial_step)
        self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                logger.warning("train.tensorboard is on but tensorboardX is not installed; "
                               "writing metrics.jsonl only")
            else:
                self._tb = SummaryWriter(str(workdir / "tensorboard"))
        stream = sys.stderr if stream is None else stream
        if progress_bar and hasattr(stream, "isatty") and stream.isatty():
            self._bar = tqdm(total=total_steps, initial=initial_step, file=stream,
                             dynamic_ncols=True, desc="train")

    def write(self, step: int, scalars: Mapping[str, float], *, images: int = 0) -> dict:
        """Logs `scalars` at `step`; `images` = images processed since the previous call.

        Returns the record written (scalars plus images_per_s, eta_s, elapsed time).
        """
        now = time.perf_counter()
        steps_done = step - self._last_step
        seconds = max(now - self._last_time, 1e-9)
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        if steps_done > 0:
            record["images_per_s"] = images / seconds
            record["eta_s"] = (self.total_steps - step) * seconds / steps_done
        self._last_step, self._last_time = step, now
        if not self.enabled:
            return record
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step":
                    self._tb.add_scalar(key, value, step)
        if self._bar is not None:
            self._bar.update(steps_done)
            self._bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}",
                                  lr=f"{record.get('lr', float('nan')):.2e}",
                                  img_s=f"{record.get('images_per_s', 0.0):.1f}")
        else:
            logger.info(
                "step %d/%d loss %.4f lr %.3e %.1f img/s ETA %s", step, self.total_steps,
                record.get("loss", float("nan")), record.get("lr", float("nan")),
                record.get("images_per_s", 0.0), format_seconds(record.get("eta_s", 0.0)))
        return record

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()

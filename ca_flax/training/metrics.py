"""What the user sees: console lines, ``metrics.jsonl`` and TensorBoard events.

Only process 0 writes files; every process may log to its console.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
    """Writes one JSON object per line (each with ``step``), TensorBoard scalars and images."""

    def __init__(self, workdir: str | Path, resume_step: int = 0):
        self.is_writer = jax.process_index() == 0
        self.path = Path(workdir) / METRICS_FILE
        if self.is_writer:
            _truncate_after(self.path, resume_step)
        from clu import metric_writers  # Imported here: it pulls in TensorFlow's summary ops.

        self._tensorboard = metric_writers.create_default_writer(
            str(Path(workdir) / "tensorboard"), just_logging=not self.is_writer, asynchronous=True
        )

    def write(self, step: int, values: dict[str, float]) -> None:
        if self.is_writer:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": int(step), **{k: _jsonable(v) for k, v in values.items()}}) + "\n")
        self._tensorboard.write_scalars(step, {k: v for k, v in values.items() if isinstance(v, (int, float))})

    def write_images(self, step: int, images: dict[str, Any]) -> None:
        """TensorBoard images: name -> uint8 ``[N, H, W, 3]`` (only process 0 writes)."""
        self._tensorboard.write_images(step, images)

    def close(self) -> None:
        self._tensorboard.flush()
        self._tensorboard.close()


def _jsonable(value: Any) -> Any:
    value = float(value) if hasattr(value, "__float__") and not isinstance(value, (int, bool)) else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _truncate_after(path: Path, step: int) -> None:
    """On resume, drop lines from steps after the restored checkpoint: they will be
    written again, and a reader must not see two different values for one step."""
    if not path.exists():
        return
    def keep(record: dict[str, Any]) -> bool:
        # A run's compile time is logged at its first step; the resumed run logs its own.
        return record["step"] < step or (record["step"] == step and "train_step_compile_s" not in record)

    kept = [line for line in path.read_text().splitlines() if line.strip() and keep(json.loads(line))]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


class Throughput:
    """Images per second over the steps since the last report, compile excluded: the
    clock starts after the first step has finished."""

    def __init__(self, global_batch_size: int):
        self.batch = global_batch_size
        self._start: float | None = None
        self._steps = 0

    def start(self) -> None:
        self._start, self._steps = time.perf_counter(), 0

    def step(self, count: int = 1) -> None:
        self._steps += count

    def report(self) -> float | None:
        """Images/s since ``start`` (None before the clock started), then restarts."""
        if self._start is None or self._steps == 0:
            return None
        rate = self._steps * self.batch / (time.perf_counter() - self._start)
        self.start()
        return rate


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def console(line: str) -> None:
    logging.info(line)
    if jax.process_index() == 0:
        print(line, flush=True)

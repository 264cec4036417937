"""``metrics.jsonl`` (one object per logged optimizer step / evaluation) and TensorBoard; rank 0 only.

TensorBoard gets what a person watches: training reward, distillation loss, gradient norm and step
time, evaluation rewards and drift, all against the global step of the task sequence, plus the
evaluation image grids. Bookkeeping fields (task and step numbers, skip counters) stay in
metrics.jsonl only. The event file is opened on the first value, so a rerun with nothing to do
leaves no empty one behind, and a resumed run hides the events it is about to write again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Fields of a record that say where it belongs, not how training goes: never TensorBoard scalars.
BOOKKEEPING = frozenset({"task", "step", "global_step", "row", "skipped", "bad_in_a_row"})


class MetricsLog:
    """Appends JSON lines to ``output_dir/metrics.jsonl`` and values to TensorBoard (rank 0)."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb_dir = Path(output_dir) / "tensorboard" if enabled and tensorboard else None
        self._tb = None
        self._purge_step: int | None = None

    def resume_at(self, global_step: int) -> None:
        """Events after ``global_step`` in an earlier session's files are hidden: they are written again."""
        self._purge_step = global_step + 1

    def _writer(self):
        if self._tb is None and self._tb_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self._tb_dir), purge_step=self._purge_step)
            except ImportError:  # tensorboard is a dependency; a broken install only loses the TB view
                self._tb_dir = None
        return self._tb

    def lines(self) -> int:
        if not self.path.is_file():
            return 0
        with open(self.path, "rb") as f:
            return sum(1 for _ in f)

    def truncate(self, n_lines: int) -> None:
        """Drop lines written after the checkpoint being resumed (they will be written again)."""
        if not self.enabled or not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            kept = [line for _, line in zip(range(n_lines), f)]
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def write(self, record: dict, tb_step: int | None = None) -> None:
        """One line of metrics.jsonl; its numeric non-bookkeeping values as ``<kind>/<key>`` at ``tb_step``."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        scalars = {key: value for key, value in record.items() if key not in BOOKKEEPING
                   and isinstance(value, (int, float)) and not isinstance(value, bool)}
        if tb_step is None or not scalars or self._writer() is None:
            return
        prefix = record.get("kind", "train")
        for key, value in scalars.items():
            self._tb.add_scalar(f"{prefix}/{key}", value, tb_step)

    def image(self, tag: str, image, step: int) -> None:
        """An (H, W, 3) uint8 image in TensorBoard's images tab."""
        if self.enabled and self._writer() is not None:
            self._tb.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

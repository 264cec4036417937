"""Run header, ``metrics.jsonl`` (one object per optimizer step / evaluation) and TensorBoard; rank 0 only."""

from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLog:
    """Appends JSON lines to ``output_dir/metrics.jsonl`` and scalars to TensorBoard (rank 0)."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except ImportError:  # tensorboard is a dependency; a broken install only loses the TB view
                self._tb = None

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
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self._tb is not None and tb_step is not None:
            prefix = record.get("kind", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self._tb.add_scalar(f"{prefix}/{key}", value, tb_step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

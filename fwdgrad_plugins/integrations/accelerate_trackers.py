"""Accelerate trackers that write plain files: JSON lines and CSV, readable without any service.

Accelerate ships trackers for TensorBoard, W&B and others, but none that writes a plain file;
these two are ``accelerate.tracking.GeneralTracker`` subclasses, passed to
``Accelerator(log_with=[...])`` like the built-in ones. Both write on the main process only.

>>> import json, tempfile
>>> from pathlib import Path
>>> folder = tempfile.mkdtemp()
>>> tracker = JSONLinesTracker(folder)
>>> tracker.store_init_configuration({"lr": 2e-4})
>>> tracker.log({"fwdgrad/train_loss": 2.3}, step=1)
>>> tracker.finish()
>>> [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
[{'config': {'lr': 0.0002}}, {'step': 1, 'fwdgrad/train_loss': 2.3}]
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from typing import Optional

from accelerate.tracking import GeneralTracker, on_main_process


class _FileTracker(GeneralTracker):
    requires_logging_directory = True
    filename = ""

    def __init__(self, logging_dir):
        super().__init__()
        self.path = Path(logging_dir) / self.filename
        self._file = None

    @property
    def tracker(self):
        return self._file

    def _open(self):
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", newline="")
        return self._file

    @on_main_process
    def finish(self):
        if self._file is not None:
            self._file.close()
            self._file = None


class JSONLinesTracker(_FileTracker):
    """One JSON object per line in ``<logging_dir>/metrics.jsonl``: the configuration, then
    ``{"step": s, name: value, ...}`` per ``log`` call."""

    name = "jsonl"
    filename = "metrics.jsonl"

    @on_main_process
    def store_init_configuration(self, values: dict):
        self._write({"config": values})

    @on_main_process
    def log(self, values: dict, step: Optional[int] = None, **kwargs):
        self._write({"step": step, **values})

    def _write(self, record: dict) -> None:
        file = self._open()
        file.write(json.dumps(record) + "\n")
        file.flush()


class CSVTracker(_FileTracker):
    """Long-format CSV in ``<logging_dir>/metrics.csv``: one ``step,name,value`` row per value,
    so runs logging different names share one file. The configuration goes to ``config.json``."""

    name = "csv"
    filename = "metrics.csv"

    @on_main_process
    def store_init_configuration(self, values: dict):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        (self.path.parent / "config.json").write_text(json.dumps(values, indent=2))

    @on_main_process
    def log(self, values: dict, step: Optional[int] = None, **kwargs):
        file = self._open()
        writer = csv.writer(file)
        if file.tell() == 0:
            writer.writerow(["step", "name", "value"])
        for name, value in values.items():
            writer.writerow([step, name, value])
        file.flush()


def file_trackers(logging_dir) -> list:
    """The JSON-lines and CSV trackers for ``logging_dir``, plus ``"tensorboard"`` when
    tensorboard is installed: the value for ``Accelerator(log_with=...)``."""
    trackers: list = [JSONLinesTracker(logging_dir), CSVTracker(logging_dir)]
    if importlib.util.find_spec("tensorboard") is not None:
        trackers.append("tensorboard")
    return trackers

"""A benchmark's JSON rows, written as they are measured: the file is rewritten whole after each row (a temporary
file, then a rename), so a run cut short by its timeout (benchmarks/device_run.sh's deadline) or by a failure keeps
every figure it measured, and a reader never sees half a file."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path


class RowsFile:
    def __init__(self, path: Path, header: dict | None = None):
        """header: fields written beside the rows ({**header, "rows": [...]}); without one, the file is the list."""
        self.path, self.header, self.rows = Path(path), header, []
        self.add()

    def add(self, *rows: dict) -> None:
        self.rows.extend(rows)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.rows if self.header is None else {**self.header, "rows": self.rows}, indent=2))
        os.replace(tmp, self.path)

    def extend(self, rows: Iterable[dict]) -> None:
        """The rows of a generator that measures them, each written as it comes."""
        for row in rows:
            self.add(row)

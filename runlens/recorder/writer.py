"""Background writer that turns buffered rows into immutable Parquet part files."""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
from pathlib import Path

import pyarrow.parquet as pq

from runlens import format as run_format
from runlens.recorder.buffers import PendingPart

logger = logging.getLogger("runlens.record")


class PartWriter:
    """Writes each submitted `PendingPart` as one part file, in a daemon thread.

    A part is written to a temporary name in its table folder and renamed into place, so
    a process killed mid-write leaves at most a temporary file that readers skip.
    """

    def __init__(self, run_dir: Path, rank: int, segment: int) -> None:
        self._run_dir = run_dir
        self._rank = rank
        self._segment = segment
        self._sequence = itertools.count()
        self._queue: queue.Queue[PendingPart | None] = queue.Queue()
        self.error_count = 0
        self.parts_written = 0
        self._thread = threading.Thread(target=self._run, name="runlens-writer", daemon=True)
        self._thread.start()

    def submit(self, part: PendingPart) -> None:
        self._queue.put(part)

    def close(self, timeout: float = 60.0) -> None:
        """Write every submitted part, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("runlens writer did not finish within %.0f s; some rows may be lost",
                           timeout)

    def _run(self) -> None:
        while True:
            part = self._queue.get()
            if part is None:
                return
            try:
                self._write(part)
            except Exception:  # noqa: BLE001 - the writer must outlive any single bad part
                self.error_count += 1
                if self.error_count == 1:
                    logger.exception("runlens could not write a %s part; later errors are "
                                     "counted, not logged", part.table)

    def _write(self, part: PendingPart) -> None:
        table = part.materialize()
        folder = self._run_dir / part.table / run_format.rank_folder(self._rank)
        folder.mkdir(parents=True, exist_ok=True)
        name = run_format.part_name(self._segment, next(self._sequence))
        temporary = folder / f"{run_format.TEMP_PREFIX}{name}"
        pq.write_table(table, temporary)
        os.replace(temporary, folder / name)
        self.parts_written += 1

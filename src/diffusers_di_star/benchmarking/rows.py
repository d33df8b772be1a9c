"""Run benchmark rows one after another under a total time budget, each under its own time limit, saving as they go.

A row that runs out of GPU memory, passes its time limit or raises is recorded as such and the next row runs, so one
slow or broken row cannot sink a run. Each row gets ``min(its limit, what is left of the budget)``; a row that would
get less than its ``min_seconds`` is skipped, so the whole run ends within the budget by construction (plus the time
to leave the row that was running: Python code notices the limit at once, one CUDA kernel or compiler call finishes
first). Every record a row emits and every row's outcome is written to the JSON file at once (atomically), and a line
is printed, so a run that is cut off still leaves its results.

The limit is ``SIGALRM`` (``signal.setitimer``): main thread, POSIX only. :class:`RowTimeLimit` derives from
``BaseException`` so that no library's ``except Exception`` swallows it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .measure import free_memory

__all__ = [
    "ERROR",
    "OK",
    "OUT_OF_MEMORY",
    "RUNNING",
    "SKIPPED",
    "TIME_LIMIT",
    "Row",
    "RowRunner",
    "RowTimeLimit",
    "time_limit",
]

OK, OUT_OF_MEMORY, TIME_LIMIT, SKIPPED, ERROR = "ok", "out of memory", "time limit", "skipped", "error"
#: The status of the row being run; a run killed from outside leaves it in the JSON file.
RUNNING = "running (the run was cut off here)"


class RowTimeLimit(BaseException):
    """A row ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`RowTimeLimit` in the main thread once ``seconds`` have passed inside the block."""

    def expire(signum, frame):
        raise RowTimeLimit(f"ran past its {seconds:.3g} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass(frozen=True)
class Row:
    """One step of a run. ``run(emit)`` does the work and passes each finished record to ``emit`` at once.

    ``limit_seconds`` bounds it; ``min_seconds`` is the least time worth starting it with.
    """

    name: str
    run: Callable[[Callable[[dict], None]], None]
    limit_seconds: float
    min_seconds: float = 5.0


class RowRunner:
    """Runs :class:`Row` s within ``budget_seconds`` and keeps ``{"header": ..., "rows": [...]}`` in ``json_path``.

    ``on_change(document)`` is called after every save (the report writer re-renders from it); ``log`` prints.
    """

    def __init__(
        self,
        json_path: str | os.PathLike,
        header: dict,
        budget_seconds: float,
        device: torch.device,
        on_change: Callable[[dict], None] | None = None,
        log: Callable[[str], None] = print,
    ):
        self.json_path, self.device, self.on_change, self.log = json_path, device, on_change, log
        self.document = {"header": header | {"budget_seconds": budget_seconds}, "rows": []}
        self.deadline = time.monotonic() + budget_seconds

    def _save(self) -> None:
        temporary = f"{self.json_path}.tmp"
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(self.document, file, indent=2)
        os.replace(temporary, self.json_path)
        if self.on_change is not None:
            self.on_change(self.document)

    def run(self, rows: list[Row]) -> dict:
        """Run every row in order; return the document (also in ``json_path``)."""
        self._save()
        for row in rows:
            self._run_row(row)
        return self.document

    def _run_row(self, row: Row) -> None:
        left = self.deadline - time.monotonic()
        entry = {"row": row.name, "status": SKIPPED, "seconds": 0.0, "limit_seconds": None, "records": []}
        self.document["rows"].append(entry)
        if left < row.min_seconds:
            entry["message"] = f"{max(left, 0):.0f} s of the budget left; the row needs {row.min_seconds:.0f} s"
            self._finish(entry)
            return
        entry["status"], entry["limit_seconds"] = RUNNING, min(row.limit_seconds, left)
        self._save()

        def emit(record: dict) -> None:
            entry["records"].append(record)
            self._save()
            self.log(f"[{row.name}] {json.dumps(record)}")

        start = time.monotonic()
        try:
            with time_limit(entry["limit_seconds"]):
                row.run(emit)
            entry["status"] = OK
        except RowTimeLimit as err:
            entry["status"], entry["message"] = TIME_LIMIT, str(err)
        except torch.OutOfMemoryError as err:
            entry["status"], entry["message"] = OUT_OF_MEMORY, str(err).splitlines()[0]
        except Exception as err:  # noqa: BLE001 - a broken row is a result too; the next row still runs
            entry["status"], entry["message"] = ERROR, f"{type(err).__name__}: {err}".splitlines()[0]
            entry["traceback"] = traceback.format_exc()
        entry["seconds"] = time.monotonic() - start
        # Outside the handlers: the traceback's frames (and the tensors they hold) are gone now.
        free_memory(self.device)
        self._finish(entry)

    def _finish(self, entry: dict) -> None:
        self._save()
        message = f": {entry['message']}" if entry.get("message") else ""
        self.log(f"[{entry['row']}] {entry['status']} after {entry['seconds']:.1f} s{message}")

"""A progress bar on a terminal (done/total, bytes, ETA); silent when stderr is not a terminal."""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, label: str, total: float, count: int | None = None, unit: str = "items",
                 enabled: bool | None = None, byte_counts: bool = False):
        self.bar = None
        self.done = 0
        if enabled is None:
            enabled = sys.stderr.isatty()
        if not enabled:
            return
        from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress as Bar, TextColumn,
                                   TimeRemainingColumn)

        columns = [TextColumn(label), BarColumn()]
        if byte_counts:
            columns += [TextColumn("{task.fields[done]}/{task.fields[count]} " + unit), DownloadColumn(False)]
        else:
            columns.append(MofNCompleteColumn())
        self.bar = Bar(*columns, TimeRemainingColumn(), transient=True)
        self.task = self.bar.add_task(label, total=total, done=0, count=count or 0)
        self.bar.start()

    def advance(self, amount: float = 1) -> None:
        if self.bar is not None:
            self.done += 1
            self.bar.update(self.task, advance=amount, done=self.done)

    def update(self, completed: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=completed)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def callback(label: str):
    """A (done, total) callback drawing a bar on a terminal; None elsewhere."""
    if not sys.stderr.isatty():
        return None
    state = {}

    def update(done, total):
        if "bar" not in state:
            state["bar"] = Progress(label, total)
        state["bar"].update(done)
        if done >= total:
            state["bar"].stop()

    return update

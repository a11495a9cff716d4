"""The progress bars every stage's command shows (rich), shared so that they end alike."""

from __future__ import annotations

import time
from typing import Any

from rich import progress as _rich


class Progress(_rich.Progress):
    """rich's ``Progress``, less the blank line it prints on stopping to a pipe or a file when
    it showed nothing there: with no task yet (a command refused before its first step) or a
    transient display, that line would stand between the command's output and its error line.

    To a pipe or a file rich draws nothing until the end, so a long job run in the background
    (``… > log 2>&1 &``) would say nothing for an hour: there a task still running writes one
    plain line every ``line_every_s`` seconds — its description, count and elapsed time.
    """

    line_every_s: float = 60.0

    def __init__(self, *columns: Any, **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self._last_line = time.monotonic()

    def update(self, task_id: _rich.TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._line(task_id)

    def advance(self, task_id: _rich.TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._line(task_id)

    def _line(self, task_id: _rich.TaskID) -> None:
        console = self.console
        if self.disable or console.is_interactive or console.is_jupyter:
            return
        now = time.monotonic()
        if now - self._last_line < self.line_every_s:
            return
        self._last_line = now
        task = self._tasks[task_id]
        count = f"{task.completed:,.0f}" + (f"/{task.total:,.0f}" if task.total else "")
        elapsed = time.strftime("%H:%M:%S", time.gmtime(task.elapsed or 0.0))
        console.print(f"{task.description}  {count}  {elapsed}", highlight=False, soft_wrap=True)

    def stop(self) -> None:
        console = self.console
        shown = not self.live.transient and any(t.visible for t in self.tasks)
        if self.disable or console.is_interactive or console.is_jupyter or shown:
            super().stop()
        else:
            self.live.stop()


__all__ = ["Progress"]

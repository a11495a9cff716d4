"""The progress bars every stage's command shows (rich), shared so that they end alike."""

from __future__ import annotations

from rich import progress as _rich


class Progress(_rich.Progress):
    """rich's ``Progress``, less the blank line it prints on stopping to a pipe or a file when
    it showed nothing there: with no task yet (a command refused before its first step) or a
    transient display, that line would stand between the command's output and its error line.
    """

    def stop(self) -> None:
        console = self.console
        shown = not self.live.transient and any(t.visible for t in self.tasks)
        if self.disable or console.is_interactive or console.is_jupyter or shown:
            super().stop()
        else:
            self.live.stop()


__all__ = ["Progress"]

"""How a followed batch looks: a rich progress bar on a terminal, plain status lines elsewhere (CI)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from cli.progress import BatchProgress, format_duration, status_line

STATUS_EVERY_S = 5.0  # non-terminal output: one status line at most this often


class LiveView:
    """A rich progress bar for a terminal."""

    def __init__(self, console: Console, batch_id: str) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "[green]{task.fields[ok]} completed[/] [red]{task.fields[failed]} failed[/] "
                "[cyan]{task.fields[in_flight]} in flight[/][yellow]{task.fields[queued]}[/] "
                "{task.fields[rate]:.1f} conv/min "
                "{task.fields[elapsed]}"
            ),
            console=console,
            transient=False,
        )
        self.task: TaskID = self.progress.add_task(
            f"batch {batch_id}", total=None, ok=0, failed=0, in_flight=0, queued="", rate=0.0, elapsed="")
        self.progress.start()

    def update(self, p: BatchProgress, now: float, caught_up: bool) -> None:
        self.progress.update(
            self.task, total=p.requested, completed=p.done, ok=p.completed, failed=p.failed,
            in_flight=p.in_flight, queued=p.waiting, rate=p.rate_per_min(now),
            elapsed=format_duration(elapsed) if (elapsed := p.elapsed(now)) is not None else "",
        )

    def close(self) -> None:
        self.progress.stop()


class LineView:
    """Plain status lines for logs and CI: after the replay, then every few seconds."""

    def __init__(self, console: Console, batch_id: str) -> None:
        self.console = console
        self.last = -math.inf
        self.last_text = ""
        self.was_caught_up = False

    def update(self, p: BatchProgress, now: float, caught_up: bool) -> None:
        due = time.monotonic() - self.last >= STATUS_EVERY_S
        if (caught_up and not self.was_caught_up) or (caught_up and due):
            text = status_line(p, now)
            if text != self.last_text:
                self.console.print(text)
                self.last_text = text
            self.last = time.monotonic()
        self.was_caught_up = caught_up

    def close(self) -> None:
        pass


def view_factory(console: Console) -> Callable[[str], LiveView | LineView]:
    def make(batch_id: str) -> LiveView | LineView:
        return LiveView(console, batch_id) if console.is_terminal else LineView(console, batch_id)

    return make

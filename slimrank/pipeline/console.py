"""Rich output shared by the ``compress``, ``pipeline`` and ``retrain`` commands (CLI side only)."""

from __future__ import annotations

import contextlib
from typing import Any

from rich.console import Console
from rich.table import Table

from slimrank.pipeline.cache import StepOutput
from slimrank.pipeline.report import Report, table_caption, table_cells
from slimrank.pipeline.run import STEPS, StepHook


class StepPrinter:
    """A step hook that shows a spinner while a step runs and one line when it ends."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._status: Any = None

    def __call__(self, name: str, output: StepOutput | None, seconds: float | None) -> None:
        number = STEPS.index(name) + 1 if name in STEPS else 0
        prefix = f"[{number:>2}/{len(STEPS)}] {name}"
        if output is None:
            self._status = self.console.status(f"{prefix} running ...")
            self._status.start()
            return
        self.close()
        if seconds == 0.0 and not output.cached:
            how = "[cyan]provided[/]"
        elif output.cached:
            how = "[dim]cached[/]"
        else:
            how = f"[green]done[/] in {seconds:.1f} s"
        self.console.print(f"{prefix:<28} {how}  [dim]{output.path.name}[/]")

    def close(self) -> None:
        """Stop the spinner if one is running (also on errors)."""
        if self._status is not None:
            with contextlib.suppress(Exception):
                self._status.stop()
            self._status = None


def hook_for(console: Console) -> StepHook:
    """Return a :class:`StepPrinter` for ``console``."""
    return StepPrinter(console)


def print_report(report: Report, console: Console, title: str = "Compression") -> None:
    """Print the compression table and the goals."""
    header, rows = table_cells(report)
    # Nine columns fit 80 characters only without cell padding; fold rather than cut numbers.
    padding = (0, 1) if console.width >= 100 else (0, 0)
    table = Table(title=title, caption=table_caption(report), padding=padding)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right", overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for goal, met, seen in report.goals:
        mark = "[green]met    [/]" if met else "[red]not met[/]"
        console.print(f"  {mark} {goal}: {seen}")

"""Output ``table``: a live cilium-health-style table on a terminal, else one per round."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from anyio.abc import TaskStatus

from healthmesh import ComponentSettings, Output, Snapshot, hookimpl, summary_table

if TYPE_CHECKING:
    from rich.live import Live


class TableSettings(ComponentSettings):
    """``[outputs.table]``."""

    live: bool = True  # redraw in place when stdout is a terminal


class TableOutput(Output):
    """Prints the summary table after every round."""

    name = "table"
    console = True
    Settings = TableSettings

    def __init__(self, settings: TableSettings, context: object) -> None:
        super().__init__(settings, context)  # type: ignore[arg-type]
        from rich.console import Console  # here: rich is loaded only when a table is shown

        self.out = Console(file=sys.stdout)
        self.live: Live | None = None

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        if self.settings.live and self.out.is_terminal:
            from rich.live import Live

            self.live = Live(console=self.out, auto_refresh=False)
            self.live.start()
        task_status.started()
        try:
            import anyio

            await anyio.sleep_forever()
        finally:
            if self.live is not None:
                self.live.stop()

    async def round_completed(self, snapshot: Snapshot) -> None:
        table = summary_table(snapshot.data)
        if self.live is not None:
            self.live.update(table, refresh=True)
        else:
            self.out.print(table)
            self.out.print()

    async def close(self, snapshot: Snapshot) -> None:
        if self.context.once:
            self.out.print(summary_table(snapshot.data))


@hookimpl
def register_outputs(register: object) -> None:
    register(TableOutput)  # type: ignore[operator]

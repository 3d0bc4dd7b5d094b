"""The running part of `groundloop search`: the dashboard, the progress display until the
search ends, and then the stopping of every role, tasks of this process and role processes
alike. A role process that dies while the search runs ends it (SearchEndedBadly, exit 1)
with the role's name, exit status and the tail of its log."""

from __future__ import annotations

import asyncio

from groundloop import events as ev
from groundloop.api.store import SearchRow
from groundloop.cli.progress import console, watch
from groundloop.cli.report_rl import policy_steps_settled
from groundloop.cli.role_processes import RoleProcessDied, RoleProcesses
from groundloop.cli.search_settings import SearchEndedBadly
from groundloop.settings import Settings


async def watch_until_ended(
    settings: Settings,
    started: ev.SearchStarted,
    stop: asyncio.Event,
    tasks: list[asyncio.Task],
    children: RoleProcesses,
    ui_port: int | None,
) -> SearchRow | None:
    """Serve the dashboard and show progress until the search ends (its row) or `stop` is
    set (None); then stop every role, tasks and processes alike, and wait for them. A role
    process that dies ends the search with SearchEndedBadly naming it."""
    dashboard = None
    try:
        if ui_port is not None:
            dashboard = await dashboard_on(settings, ui_port)
        try:
            ended = await watch(settings, started.search_id, stop, tasks)
            if ended is not None and ended.status != "stopped" and started.rl is not None:
                await policy_steps_settled(settings, started.search_id, stop)
                children.raise_failure()  # e.g. the rl-trainer died on the last step
        except RuntimeError as exc:  # watch's "a service stopped unexpectedly"
            if isinstance(exc.__cause__, RoleProcessDied):
                raise SearchEndedBadly(str(exc.__cause__)) from None
            raise
        except RoleProcessDied as exc:
            raise SearchEndedBadly(str(exc)) from None
        return ended
    finally:
        if dashboard is not None:
            await dashboard.stop()
        stop.set()
        await asyncio.gather(*tasks, children.stop(), return_exceptions=True)


async def dashboard_on(settings: Settings, ui_port: int):
    """The live dashboard on 127.0.0.1:`ui_port`, or on a free port when that one is taken."""
    from groundloop.api.serve import DashboardError, start_dashboard

    try:
        try:
            dashboard = await start_dashboard(settings, "127.0.0.1", ui_port)
        except DashboardError as exc:  # e.g. another search's dashboard holds the port
            console.print(f"[yellow]{exc}; serving the dashboard on a free port instead[/]")
            dashboard = await start_dashboard(settings, "127.0.0.1", 0)
    except DashboardError as exc:
        raise SearchEndedBadly(str(exc)) from None
    console.print(f"dashboard: {dashboard.url}")
    return dashboard

"""The `groundloop` command line.

    groundloop search --env tinygpt      run a search end to end (embedded broker, all services)
    groundloop broker                    run the embedded broker in the foreground
    groundloop events tail [--search ID] [--follow]
    groundloop events dead-letters [ROLE]  quarantined log entries, and a role's dead letters
    groundloop replay rebuild            fold the log into new projections, then swap them in
    groundloop searches                  list searches from the projections
    groundloop analyze SEARCH [SEARCH…]  execution rate, idea classes, diversity, scores (+ plots)

With no GROUNDLOOP_NATS_URL the CLI starts (or reuses) a local nats-server with JetStream
whose store lives under GROUNDLOOP_DATA_DIR (default ~/.groundloop).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from groundloop.archive import archived_note
from groundloop.broker import DEFAULT_PORT, BrokerError, EmbeddedBroker
from groundloop.bus import BrokerUnavailable, Bus
from groundloop.events import Event
from groundloop.permissions import Names
from groundloop.quarantine import Quarantined
from groundloop.settings import Settings
from groundloop.telemetry import configure_logging

app = typer.Typer(no_args_is_help=True, add_completion=False, help=(__doc__ or "").split("\n\n")[0])
events_app = typer.Typer(no_args_is_help=True, help="Read the event log.")
replay_app = typer.Typer(no_args_is_help=True, help="Rebuild, re-decide or fork from the log.")
app.add_typer(events_app, name="events")
app.add_typer(replay_app, name="replay")
console = Console()


@contextlib.contextmanager
def connected_settings(settings: Settings) -> Iterator[Settings]:
    """Settings with a reachable NATS URL: the configured one, or the embedded broker's."""
    if settings.nats_url:
        yield settings
        return
    try:
        with EmbeddedBroker(settings.data_dir, names=Names.of(settings)) as broker:
            if broker.owned:
                console.print(f"[dim]embedded nats-server on {broker.url}, store {broker.root}[/]")
            yield settings.model_copy(update={"nats_url": broker.url})
    except BrokerError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None


def run_async(coro) -> None:
    try:
        asyncio.run(coro)
    except BrokerUnavailable as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None


ERROR_CHARS = 300  # of an error shown on one tail line; `events tail` is for scanning


def _first_line(text: str) -> str:
    line = next((part for part in text.splitlines() if part.strip()), "")
    return line if len(line) <= ERROR_CHARS else line[: ERROR_CHARS - 1] + "…"


def format_quarantined(entry: Quarantined) -> str:
    return f"[red]quarantined[/] seq {entry.seq} {entry.subject}: {_first_line(entry.reason)}"


def format_entry(entry: Event | Quarantined) -> str:
    return format_quarantined(entry) if isinstance(entry, Quarantined) else format_event(entry)


def format_event(event: Event) -> str:
    """One line per event; failures (PatchFailed, a RunCompleted that did not succeed,
    SearchStopped) show their stage and error, so the tail says what went wrong."""
    keys = (
        "generation",
        "idea_id",
        "patch_id",
        "run_id",
        "status",
        "score",
        "title",
        "stage",
        "planned",
        "proposed",
        "error_type",
        "reason",
    )
    detail = " ".join(
        f"{k}={getattr(event, k)}" for k in keys if getattr(event, k, None) is not None
    )
    error = getattr(event, "last_error", None) or getattr(event, "error_tail", None)
    if error and getattr(event, "status", "failed") != "succeeded":
        detail += f" error={_first_line(error)!r}"
    return f"{event.occurred_at:%H:%M:%S} {event.search_id} [bold]{event.TYPE}[/] {detail}"


@app.command()
def broker(port: Annotated[int, typer.Option(help="client port")] = DEFAULT_PORT) -> None:
    """Run the embedded broker in the foreground until Ctrl-C."""
    settings = Settings()
    configure_logging(settings)
    stop = threading.Event()
    # Before the broker starts: no window for a raw Ctrl-C.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    instance = EmbeddedBroker(settings.data_dir, port, names=Names.of(settings))
    with instance:
        if not instance.owned:
            console.print(f"a broker for {settings.data_dir} is already running on {instance.url}")
            return
        console.print(
            f"nats-server with JetStream on {instance.url} (store {instance.root}); Ctrl-C stops it"
        )
        while not stop.wait(0.5):
            pass


@events_app.command("tail")
def events_tail(
    search: Annotated[str | None, typer.Option(help="only this search")] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep printing new events")
    ] = False,
) -> None:
    """Print the log (one search or all) in publish order; entries that are not valid
    events are shown as quarantined."""
    settings = Settings()
    configure_logging(settings)

    async def tail(s: Settings) -> None:
        bus = await Bus.connect(s, "cli-tail")
        try:
            last = 0
            async for seq, entry in bus.entries(search):
                console.print(format_entry(entry), highlight=False, soft_wrap=True)
                last = seq
            if search and not last and (note := await archived_note(bus, search)):
                console.print(note, highlight=False, soft_wrap=True)  # compacted: say where
            while follow:
                await asyncio.sleep(0.5)
                async for seq, entry in bus.entries(search):
                    if seq > last:
                        console.print(format_entry(entry), highlight=False, soft_wrap=True)
                        last = seq
        finally:
            await bus.close()

    with connected_settings(settings) as s:
        with contextlib.suppress(KeyboardInterrupt):
            run_async(tail(s))


@events_app.command("dead-letters")
def events_dead_letters(
    role: Annotated[str | None, typer.Argument(help="also this role's dead letters")] = None,
) -> None:
    """Show the log entries quarantined as not valid events, and the messages a role
    terminated, with the reasons."""
    settings = Settings()

    async def show(s: Settings) -> None:
        bus = await Bus.connect(s, "cli-dlq")
        try:
            for entry in await bus.quarantined():
                line = f"{format_quarantined(entry)} {entry.body[:200]!r}"
                console.print(line, highlight=False, soft_wrap=True)
            for headers, body in await bus.dead_letters(role) if role else []:
                console.print(
                    f"[red]{headers.get('Groundloop-Reason')}[/] {body[:200]!r}", highlight=False
                )
        finally:
            await bus.close()

    with connected_settings(settings) as s:
        run_async(show(s))


@replay_app.command("rebuild")
def replay_rebuild(
    from_archive: Annotated[
        list[str] | None,
        typer.Option(help="archives (files, folders or search ids) to fold back in (repeatable)"),
    ] = None,
) -> None:
    """Replay the whole log into new projection tables and swap them in when done; with
    --from-archive, compacted searches are folded back in from their archives."""
    from groundloop.api.rebuild import RebuildRefused, rebuild
    from groundloop.cli.archive_commands import rebuild_from_archives

    settings = Settings()
    configure_logging(settings)
    with connected_settings(settings) as s:
        result: list = []

        async def go() -> None:
            try:
                result.append(
                    await (rebuild_from_archives(s, from_archive) if from_archive else rebuild(s))
                )
            except RebuildRefused as exc:
                console.print(f"[red]{exc}[/]")
                raise typer.Exit(2) from None

        run_async(go())
    report = result[0]
    console.print(
        f"rebuilt {settings.resolved_db_url()} from {report.events} events "
        f"in {report.seconds:.2f}s ({report.rate:,.0f} events/s)"
    )


@app.command()
def searches() -> None:
    """List searches from the projections."""
    from sqlmodel import Session, col, select

    from groundloop.api.store import SearchRow, create_tables, make_engine

    settings = Settings()
    engine = make_engine(settings.resolved_db_url())
    create_tables(engine)
    table = Table(
        "search",
        "environment",
        "strategy",
        "status",
        "best (final split)",
        "baseline (final split)",
        "started",
    )
    with Session(engine) as session:
        for row in session.exec(select(SearchRow).order_by(col(SearchRow.started_at))):
            table.add_row(
                row.search_id,
                row.environment,
                row.strategy,
                row.status,
                _fmt(row.best_score),
                _fmt(row.baseline_score),
                f"{row.started_at:%Y-%m-%d %H:%M}",
            )
    console.print(table)


@app.command("settings")
def settings_doc() -> None:
    """Print every GROUNDLOOP_* variable as Markdown (the source of docs/settings.md)."""
    from groundloop.cli.settings_doc import markdown

    print(markdown(), end="")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def main() -> None:
    # Imported here: these pull in every service, which the backbone commands don't need.
    from groundloop.cli import analysis_report, archive_commands, search_job
    from groundloop.cli import history_commands as history_cli
    from groundloop.cli.ui import ui

    search_job.register(app, replay_app)  # `search`
    history_cli.register(app, replay_app)  # `replay re-decide`, `replay fork`, `export`, `import`
    analysis_report.register(app)  # `analyze`
    archive_commands.register(app)  # `archive` (save, compact, show, verify, restore, rebuild)
    app.command("ui")(ui)  # the dashboard for any store, live or finished
    app()


if __name__ == "__main__":
    main()

"""CLI commands over a search's history (registered by `groundloop.cli.main.main`):

    groundloop replay re-decide SEARCH          a fresh evolver re-decides the recorded search;
                                                exit 1 if any decision differs
    groundloop replay fork SEARCH --from-generation K [--strategy S] [--seed N] [--new-id ID]
                                                copy generations < K into a new search and run
                                                it to completion (like `search`; re-running the
                                                same command resumes it)
    groundloop export SEARCH --format paper -o FILE.jsonl
    groundloop import FILE.jsonl --env NAME [--search-id ID]
                                                prints which rows it skipped and why

Each command is a thin wrapper over an async function of the same job (`redecide_search`,
`fork_search`, `export_search`, `import_file`), which tests call directly.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from groundloop import events as ev
from groundloop.bus import Bus
from groundloop.cli.history import HistoryError, export_paper, fork, import_paper, publish_all
from groundloop.cli.paper_rows import PaperImport
from groundloop.execution.environment import Environment
from groundloop.manifest import ManifestError
from groundloop.settings import Settings
from groundloop.telemetry import configure_logging

console = Console()


async def read_search(settings: Settings, search_id: str) -> list[ev.Event]:
    bus = await Bus.connect(settings, "cli-history")
    try:
        events = [e async for e in bus.events(search_id)]
    finally:
        await bus.close()
    if not events:
        raise HistoryError(
            f"no events for search {search_id!r} in stream {settings.stream}; "
            "`groundloop searches` lists the searches"
        )
    return events


async def redecide_search(settings: Settings, search_id: str):
    """The RedecideReport of one recorded search (environments from settings)."""
    from groundloop.evolver.redecide import redecide
    from groundloop.evolver.service import Deps, ManifestLookup

    events = await read_search(settings, search_id)
    return redecide(events, Deps(environments=ManifestLookup(settings.environments_dir)))


def default_fork_id(source: str, generation: int, strategy: str) -> str:
    suffix = f"-fork{generation}-{strategy.replace('_', '-')}"
    if len(source) + len(suffix) <= 64:
        return source + suffix
    digest = hashlib.sha256(source.encode()).hexdigest()[:8]
    return f"{source[: 64 - len(suffix) - 9]}-{digest}{suffix}"


async def fork_search(
    settings: Settings,
    source_id: str,
    from_generation: int,
    *,
    strategy: str | None = None,
    seed: int | None = None,
    new_id: str | None = None,
    slots: int = 1,
    report_dir: Path | None = None,
    with_runner: bool = True,
) -> Path | None:
    """Publish the fork of `source_id` at generation `from_generation`, then run every service
    until it completes; returns the report folder (None if stopped first)."""
    from groundloop.cli.search_job import run_search

    source = await read_search(settings, source_id)
    started_src = next((e for e in source if isinstance(e, ev.SearchStarted)), None)
    name = new_id or default_fork_id(
        source_id, from_generation, strategy or (started_src.strategy if started_src else "same")
    )
    events = fork(source, name, from_generation, strategy=strategy, seed=seed)
    *copied, started = events
    assert isinstance(started, ev.SearchStarted)
    env = Environment.load(started.environment, settings.environments_dir)
    if env.digest() != started.environment_digest:
        console.print(
            f"[yellow]environment {env.name} changed since {source_id} ran; runners will "
            "refuse the fork's runs until the recorded version is deployed[/]"
        )
    bus = await Bus.connect(settings, "cli-fork")
    try:
        # Only the first time: a resumed fork already has its past (and is past it).
        if not [e async for e in bus.events(name) if isinstance(e, ev.SearchStarted)]:
            stored = await publish_all(bus, copied)
            console.print(
                f"fork [bold]{name}[/]: copied {stored} events of generations "
                f"< {from_generation} from {source_id}"
            )
    finally:
        await bus.close()
    return await run_search(
        settings,
        started,
        env,
        slots=slots,
        report_dir=report_dir or settings.data_dir / "reports",
        with_runner=with_runner,
    )


async def export_search(settings: Settings, search_id: str, output: Path) -> int:
    """Write the search's ideas as paper-format JSONL; returns the number of rows."""
    events = await read_search(settings, search_id)
    keys = {
        e.diff_key for e in events if isinstance(e, ev.PatchReady) and e.diff is None and e.diff_key
    }
    diffs: dict[str, str] = {}
    if keys:
        bus = await Bus.connect(settings, "cli-export")
        try:
            for key in keys:
                diffs[key] = (await bus.get_artifact(key)).decode()
        finally:
            await bus.close()
    rows = export_paper(events, diffs, metric=_metric_of(settings, events))
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)


def _metric_of(settings: Settings, events: list[ev.Event]) -> str | None:
    """The search's environment's metric name, when that environment is installed here
    (otherwise export names the metric the runs reported)."""
    started = next((e for e in events if isinstance(e, ev.SearchStarted)), None)
    if started is None:
        return None
    try:
        return Environment.load(started.environment, settings.environments_dir).manifest.metric.name
    except (ManifestError, OSError):
        return None


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise HistoryError(f"{path}:{number}: not JSON ({exc})") from None
    return rows


def default_import_id(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", path.stem).strip("-")[:40] or "file"
    return f"import-{stem}-{hashlib.sha256(path.read_bytes()).hexdigest()[:8]}"


async def import_file(
    settings: Settings, path: Path, env_name: str, search_id: str | None = None
) -> tuple[str, int, PaperImport]:
    """Publish a paper-format JSONL file as a new, completed search; (search id, events
    stored, what was imported and skipped)."""
    name = search_id or default_import_id(path)
    env = Environment.load(env_name, settings.environments_dir)
    imported = import_paper(read_jsonl(path), name, env)
    bus = await Bus.connect(settings, "cli-import")
    try:
        return name, await publish_all(bus, imported.events), imported
    finally:
        await bus.close()


def register(app: typer.Typer, replay_app: typer.Typer) -> None:
    from groundloop.cli.main import connected_settings, run_async

    def run(job) -> list:
        """Run `job(settings)` on a reachable broker; HistoryError → a red message, exit 2."""
        settings = Settings()
        configure_logging(
            settings.model_copy(update={"log_level": "WARNING"})
            if sys.stdout.isatty()
            else settings
        )
        result: list = []
        with connected_settings(settings) as s:

            async def go() -> None:
                result.append(await job(s))

            try:
                run_async(go())
            except (HistoryError, ManifestError) as exc:
                console.print(f"[red]{exc}[/]")
                raise typer.Exit(2) from None
        return result

    @replay_app.command("re-decide")
    def re_decide(search: str) -> None:
        """Feed a recorded search to a fresh evolver; report every decision that differs."""
        (report,) = run(lambda s: redecide_search(s, search))
        for difference in report.differences:
            console.print(f"[red]{difference.describe()}[/]", highlight=False)
        verdict = (
            "[green]same decisions[/]" if report.ok else f"[red]{len(report.differences)} differ[/]"
        )
        console.print(
            f"{search}: {report.events} events re-decided; {report.recorded} recorded "
            f"decisions, {report.redecided} re-decided: {verdict}"
        )
        if not report.ok:
            raise typer.Exit(1)

    @replay_app.command("fork")
    def fork_command(
        search: str,
        from_generation: Annotated[
            int, typer.Option("--from-generation", help="carry generations < K")
        ],
        strategy: Annotated[
            str | None, typer.Option(help="evolution | best_of_n (default: the source's)")
        ] = None,
        seed: Annotated[
            int | None, typer.Option(help="search seed (default: the source's)")
        ] = None,
        new_id: Annotated[
            str | None,
            typer.Option(help="new search id; default <source>-fork<K>-<strategy>, which resumes"),
        ] = None,
        slots: Annotated[int, typer.Option(help="runs at once on this machine")] = 1,
        runner: Annotated[
            bool, typer.Option(help="run a local runner (off: use remote runner replicas)")
        ] = True,
        report_dir: Annotated[Path | None, typer.Option(help="default: <data dir>/reports")] = None,
    ) -> None:
        """Start a new search from generation K of a recorded one and run it to completion."""
        (out,) = run(
            lambda s: fork_search(
                s,
                search,
                from_generation,
                strategy=strategy,
                seed=seed,
                new_id=new_id,
                slots=slots,
                report_dir=report_dir,
                with_runner=runner,
            )
        )
        if out is not None:
            console.print(f"[green]done[/]: report in {out}")
            print((out / "leaderboard.md").read_text())  # plain: Markdown must not be re-wrapped

    @app.command("export")
    def export_command(
        search: str,
        output: Annotated[Path, typer.Option("--output", "-o", help="JSONL file to write")],
        format: Annotated[
            str, typer.Option("--format", help="paper: the released trajectory fields")
        ] = "paper",
    ) -> None:
        """Write a search's ideas, patches and results as the paper's trajectory JSONL."""
        if format != "paper":
            console.print(f"[red]unknown format {format!r}; the one format is 'paper'[/]")
            raise typer.Exit(2)
        (count,) = run(lambda s: export_search(s, search, output))
        console.print(f"wrote {count} rows to {output}")

    @app.command("import")
    def import_command(
        file: Path,
        env: Annotated[str, typer.Option(help="environment the trajectories belong to")],
        search_id: Annotated[
            str | None, typer.Option(help="new search id; default import-<file>-<hash>")
        ] = None,
    ) -> None:
        """Read paper-format trajectory JSONL into a new, completed search (nothing is run)."""
        if not file.is_file():
            console.print(f"[red]{file}: no such file[/]")
            raise typer.Exit(2)
        ((name, stored, imported),) = run(lambda s: import_file(s, file, env, search_id))
        print(imported.summary())  # plain: row reasons quote code and must not be re-wrapped
        console.print(
            f"imported {file} as search [bold]{name}[/] ({stored} new events); "
            f"fork it with: groundloop replay fork {name} --from-generation K"
        )

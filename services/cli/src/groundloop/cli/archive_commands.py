"""CLI commands that move finished searches out of the log and back (groundloop.archive):

    groundloop archive SEARCH [--to DIR | --to-object-store]
                                        one compressed file of the search's raw log entries
                                        (signatures included) and a manifest; catalogued in
                                        the object store either way
    groundloop archive compact SEARCH   purge a finished, archived search from the stream,
                                        after reading its archive back identical
    groundloop archive show SEARCH      where the search's archive is, its counts and sizes
    groundloop archive verify SOURCE    read an archive back against its manifest
    groundloop archive restore SOURCE   republish an archive into the stream
    groundloop archive rebuild SOURCE…  rebuild the projections from the stream with the
                                        archives folded in at their original sequences

SOURCE is an archive or manifest file, or `object-store:<bucket>/<key>` (as `show` prints).
These are administrator jobs: the connection logs in as the operator (the only role allowed
to purge), so with credentials the operator's seed must be in the credentials folder.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from typer.core import TyperGroup

from groundloop import archive
from groundloop.bus import Bus
from groundloop.events import Event
from groundloop.quarantine import Quarantined
from groundloop.settings import Settings

console = Console()
CONNECTION = "operator-archive"  # any name outside the roles' is the operator (permissions)


class ArchiveGroup(TyperGroup):
    """`groundloop archive SEARCH …` means `groundloop archive save SEARCH …`."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["save", *args]
        return super().resolve_command(ctx, args)


async def _with_bus(settings: Settings, job):
    bus = await Bus.connect(settings, CONNECTION)
    try:
        return await job(bus)
    finally:
        await bus.close()


async def save(settings: Settings, search_id: str, folder: Path | None) -> archive.Manifest:
    return await _with_bus(settings, lambda bus: archive.write(bus, search_id, folder))


async def compact(settings: Settings, search_id: str) -> archive.Manifest:
    return await _with_bus(settings, lambda bus: archive.compact(bus, search_id))


async def load(settings: Settings, source: str) -> tuple[archive.Manifest, list[archive.Entry]]:
    if not source.startswith("object-store:"):
        return await archive.load(None, source)
    return await _with_bus(settings, lambda bus: archive.load(bus, source))


async def restore(settings: Settings, source: str) -> tuple[archive.Manifest, int, int]:
    manifest, entries = await load(settings, source)
    stored, skipped = await _with_bus(settings, lambda bus: archive.restore(bus, manifest, entries))
    return manifest, stored, skipped


async def show(settings: Settings, search_id: str) -> str | None:
    return await _with_bus(settings, lambda bus: archive.archived_note(bus, search_id))


# ---------------------------------------------------------------------- rebuild with archives


async def _merged(
    bus: Bus, archived: list[archive.Entry], batch: int
) -> AsyncIterator[tuple[int, Event]]:
    """The stream's events and the archived ones, in original stream order (an archived entry
    the stream still holds at its sequence comes once). Archived entries are read through
    `Bus.read` like live ones: verified, and skipped when not valid events."""
    pending = deque(sorted(archived, key=lambda e: e.seq))
    async for seq, event in bus.raw_events(batch=batch):
        while pending and pending[0].seq <= seq:
            entry = pending.popleft()
            pair = None if entry.seq == seq else await _read(bus, entry)
            if pair is not None:
                yield pair
        yield seq, event
    for entry in pending:
        pair = await _read(bus, entry)
        if pair is not None:
            yield pair


async def _read(bus: Bus, entry: archive.Entry) -> tuple[int, Event] | None:
    read = await bus.read(entry.subject, entry.body, entry.seq, entry.headers)
    return None if isinstance(read, Quarantined) else (entry.seq, read)


async def rebuild_from_archives(settings: Settings, sources: list[str], batch_size: int = 1000):
    """`replay rebuild`, with archived searches folded in where the stream lost them; the
    projections come out as they were before compaction (same events, same sequences).
    Returns the RebuildReport."""
    # The read side's own fold and swap, so the result is exactly `replay rebuild`'s.
    from groundloop.api import rebuild as replay

    archived: list[archive.Entry] = []
    for source in sources:
        archived += (await load(settings, source))[1]
    return await replay.rebuild(
        settings, batch_size, source=lambda bus: _merged(bus, archived, batch_size)
    )


# ---------------------------------------------------------------------- commands


def register(app: typer.Typer) -> None:
    from groundloop.cli.main import connected_settings, run_async

    archive_app = typer.Typer(
        cls=ArchiveGroup,
        no_args_is_help=True,
        help="Move finished searches out of the log into archives, and back.",
    )
    app.add_typer(archive_app, name="archive")

    def run(job):
        result: list = []
        with connected_settings(Settings()) as s:

            async def go() -> None:
                try:
                    result.append(await job(s))
                except archive.ArchiveError as exc:
                    console.print(f"[red]{exc}[/]", highlight=False)
                    raise typer.Exit(2) from None

            run_async(go())
        return result[0]

    @archive_app.command("save")
    def save_command(
        search: str,
        to: Annotated[Path | None, typer.Option("--to", help="folder for the archive")] = None,
        to_object_store: Annotated[
            bool, typer.Option("--to-object-store", help="into the artifacts bucket")
        ] = False,
    ) -> None:
        """Archive a search's log entries: one compressed file and a manifest."""
        if (to is None) != to_object_store:
            console.print("[red]say where, once: --to DIR or --to-object-store[/]")
            raise typer.Exit(2)
        manifest = run(lambda s: save(s, search, to))
        ratio = manifest.entry_bytes / max(manifest.archive_bytes, 1)
        state = f"finished ({manifest.finished_by})" if manifest.finished_by else "still running"
        console.print(
            f"archived {manifest.entries} entries of {search} (seq {manifest.first_seq}-"
            f"{manifest.last_seq}, {manifest.entry_bytes:,} bytes → {manifest.archive_bytes:,} "
            f"{manifest.compression}, {ratio:.1f}×) to {manifest.location}; search {state}",
            highlight=False,
        )

    @archive_app.command("compact")
    def compact_command(search: str) -> None:
        """Purge a finished, archived search from the stream (its archive read back first)."""
        manifest = run(lambda s: compact(s, search))
        console.print(
            f"compacted {search}: {manifest.entries} entries purged from {manifest.stream}; "
            f"the archive is {manifest.location}",
            highlight=False,
        )

    @archive_app.command("show")
    def show_command(search: str) -> None:
        """Where a search's archive is."""
        note = run(lambda s: show(s, search))
        console.print(note or f"search {search} has never been archived", highlight=False)

    @archive_app.command("verify")
    def verify_command(source: str) -> None:
        """Read an archive back and check it against its manifest (exit 2 if it does not)."""
        manifest, entries = run(lambda s: load(s, source))
        console.print(
            f"{source}: {len(entries)} entries of {manifest.search_id}, sha256 matches",
            highlight=False,
        )

    @archive_app.command("restore")
    def restore_command(source: str) -> None:
        """Republish an archive's entries into the stream (entries still there are skipped)."""
        manifest, stored, skipped = run(lambda s: restore(s, source))
        console.print(
            f"restored {stored} entries of {manifest.search_id} ({skipped} already in the "
            "stream); `groundloop replay rebuild` folds them into the projections",
            highlight=False,
        )

    @archive_app.command("rebuild")
    def rebuild_command(
        sources: Annotated[list[str], typer.Argument(help="archive or manifest files")],
    ) -> None:
        """Rebuild the projections from the stream plus archives of compacted searches."""
        from groundloop.api.rebuild import RebuildRefused

        def job(s: Settings):
            async def go():
                try:
                    return await rebuild_from_archives(s, sources)
                except RebuildRefused as exc:
                    raise archive.ArchiveError(str(exc)) from None

            return go()

        report = run(job)
        console.print(
            f"rebuilt {Settings().resolved_db_url()} from {report.events} events "
            f"({len(sources)} archive(s)) in {report.seconds:.2f}s",
            highlight=False,
        )

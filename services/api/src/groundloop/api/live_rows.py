"""The rows a live projector transaction folds into (`LiveRows`), and the write lock it takes
before reading them (`lock_for_writing`): groundloop.api.projector's `apply_many`."""

from __future__ import annotations

from sqlalchemy import Connection

from groundloop.api.rowset import Rows, driver_call


class LiveRows:
    """The rows one live transaction folds into. On SQLite they are those the same database
    connection read and wrote in its earlier transactions, kept while nothing else can have
    changed the tables since (most events touch rows the events before them did): checked
    under the write lock, as (PRAGMA data_version, which counts other connections' commits —
    projector replicas, a rebuild's swap; schema_version, DDL; and the connection's
    total_changes, its own writes outside `apply`) equal to their values when the kept rows
    were last committed. A failed transaction's rows are not kept. Elsewhere (PostgreSQL)
    every transaction reads afresh, its rows locked FOR UPDATE."""

    _INFO_KEY = "groundloop.projector.live_rows"  # in the pool's per-DBAPI-connection info
    MAX_ROWS = 20_000  # 1-2 KB each; past this the kept rows are dropped, and read again

    def __init__(self, conn: Connection):
        self.driver = conn.connection.dbapi_connection
        self.info = conn.connection.info
        self.state: tuple[object, ...] | None = None
        self.versions: tuple[object, ...] | None = None  # None: rows are never kept
        # Taken out of the info, so that no other user of the connection shares the rows.
        kept = self.info.pop(self._INFO_KEY, None)
        if conn.dialect.name != "sqlite" or self.driver is None:
            self.rows = Rows(conn, lock=True)
            return
        self.versions = driver_call(
            conn,
            "SELECT (SELECT data_version FROM pragma_data_version),"
            " (SELECT schema_version FROM pragma_schema_version)",
        ).fetchone()
        if kept is not None and kept[0] == (self.driver, self.versions, self._changes()):
            self.rows = kept[1]
            self.rows.conn = conn
        else:
            self.rows = Rows(conn)

    def _changes(self) -> int:
        return self.driver.total_changes  # type: ignore[union-attr]

    def written(self) -> None:
        """The rows are flushed: what the database will hold once committed (this connection's
        own commit changes neither data_version nor total_changes)."""
        if self.versions is not None:
            self.state = (self.driver, self.versions, self._changes())

    def keep(self) -> None:
        """After the commit: keep the rows for the connection's next transaction. (Stored
        after the connection went back to the pool: if another user wrote through it in the
        meantime, total_changes no longer matches and the rows are not used.)"""
        if self.state is not None and len(self.rows) <= self.MAX_ROWS:
            self.info[self._INFO_KEY] = (self.state, self.rows)


def lock_for_writing(conn: Connection) -> None:
    """Make the fold's reads part of its write transaction, so that two writers (projector
    replicas) never both fold a row from the same old read and one overwrites the other's
    change. PostgreSQL: `Rows(lock=True)` reads with SELECT … FOR UPDATE (a row not there yet
    is inserted by one writer; the other's unique violation is retried by the consumer).
    SQLite has no row locks, and pysqlite begins a transaction only at the first write, after
    the reads: take the database's write lock up front (BEGIN IMMEDIATE; the busy timeout
    queues the other writers)."""
    if conn.dialect.name != "sqlite":
        return
    driver = conn.connection.dbapi_connection
    if driver is not None and not driver.in_transaction:  # type: ignore[attr-defined]
        driver_call(conn, "BEGIN IMMEDIATE")

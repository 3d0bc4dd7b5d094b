"""Projection rows being folded, read and written with SQLAlchemy Core: within one
transaction (the live projector, a batch of `project_all`), or across many when the fold is
the tables' only writer (`replay rebuild`, see projector.LogFold).

The projector folds events into plain `Row` objects (attribute access over a dict of column
values) and writes them back in one executemany per table and kind when the transaction
ends. Going around the ORM is deliberate: building and tracking SQLModel instances cost
~0.5 ms per event, ten times the budget of a rebuild at 10,000 events/s.
"""

from __future__ import annotations

from collections.abc import Iterable
from operator import itemgetter
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from pydantic_core import PydanticUndefined
from sqlalchemy import Connection, Dialect, Table, and_, bindparam, select
from sqlalchemy.exc import DBAPIError
from sqlmodel import SQLModel

from groundloop.api.store import UTCDateTime

Key = tuple[Any, ...]


class Row:
    """One row's column values as attributes; setting a column marks the row for writing."""

    # Columns live in the instance __dict__ (so reads are plain attribute reads); the
    # bookkeeping fields are slots, outside it. `_queue` is the owning Rows' list of rows to
    # write: a row joins it once, when it is created or first changed after a flush.
    __slots__ = ("_table", "_new", "_dirty", "_queue", "__dict__")

    def __init__(self, table: Table, values: dict[str, Any], new: bool, queue: list[Row]):
        self.__dict__.update(values)
        object.__setattr__(self, "_table", table)
        object.__setattr__(self, "_new", new)
        object.__setattr__(self, "_dirty", new)
        object.__setattr__(self, "_queue", queue)
        if new:
            queue.append(self)

    @property
    def _values(self) -> dict[str, Any]:
        return self.__dict__

    def __setattr__(self, name: str, value: Any) -> None:
        values = self.__dict__
        if name not in values:
            raise AttributeError(f"{self._table.name} has no column {name!r}")
        if self._dirty:  # already to be written: no need to compare
            values[name] = value
            return
        old = values[name]
        if old != value or type(old) is not type(value):
            values[name] = value
            object.__setattr__(self, "_dirty", True)
            self._queue.append(self)

    def __repr__(self) -> str:
        return f"Row({self._table.name}, {self.__dict__!r})"

    def set_columns(self, fields: dict[str, Any]) -> None:
        """Set several columns: what setting each does, in one step on a row already to be
        written (most rows a fold sets many columns of are new)."""
        values = self.__dict__
        if self._dirty and fields.keys() <= values.keys():
            values.update(fields)
            return
        for name, value in fields.items():
            setattr(self, name, value)

    if TYPE_CHECKING:
        # Columns are instance attributes set from the table at run time: tell the type
        # checker reads of any column name are allowed (at run time a missing one is still an
        # AttributeError, since no __getattr__ exists).
        def __getattr__(self, name: str) -> Any: ...


# Per table: constant defaults (None where the model has none), and default factories.
_DEFAULTS: dict[str, tuple[dict[str, Any], list[tuple[str, Any]]]] = {}


def _new_values(model: type[SQLModel]) -> dict[str, Any]:
    """Column values of a fresh row: the model's defaults, None elsewhere."""
    table: Table = model.__table__  # type: ignore[attr-defined]
    if table.name not in _DEFAULTS:
        constants: dict[str, Any] = {c.name: None for c in table.columns}
        factories = []
        for name, field in model.model_fields.items():
            if field.default_factory is not None:
                factories.append((name, field.default_factory))
            elif field.default is not PydanticUndefined:
                constants[name] = field.default
        _DEFAULTS[table.name] = (constants, factories)
    constants, factories = _DEFAULTS[table.name]
    values = dict(constants)
    for name, factory in factories:
        values[name] = factory()
    return values


_COLUMN_NAMES: dict[str, list[str]] = {}


def _column_names(table: Table) -> list[str]:
    names = _COLUMN_NAMES.get(table.name)
    if names is None:
        names = _COLUMN_NAMES[table.name] = [c.name for c in table.columns]
    return names


class Rows:
    """The rows one fold reads and writes, cached by table and primary key (misses included,
    so after `prefetch` a whole batch is folded without one SELECT per event). The cache
    stays valid across flushes and commits for as long as nobody else writes the tables (a
    rebuild's scratch file; the live projector checks it per transaction, see
    live_rows.LiveRows); otherwise make a new Rows per transaction."""

    def __init__(
        self, conn: Connection, *, lock: bool = False, empty: bool = False, known: int = 0
    ):
        self.conn = conn
        self.lock = lock  # SELECT … FOR UPDATE (PostgreSQL) when several writers may race
        self._tables: dict[str, dict[Key, Row | None]] = {}
        # empty=True: the tables held nothing when this Rows began and only it writes them,
        # so a key it never wrote is known to be absent without a query. Keys of rows it
        # has forgotten are kept here (up to `known` of them; past that it asks again).
        self._forgotten: dict[str, set[Key]] | None = {} if empty else None
        self._known = known
        self._queue: list[Row] = []  # new and changed rows, in the order they became so
        self._inserts: dict[str, tuple[Table, list[dict[str, Any]]]] = {}

    def _cache(self, table: Table) -> dict[Key, Row | None]:
        cache = self._tables.get(table.name)
        if cache is None:
            cache = self._tables[table.name] = {}
        return cache

    def _load(self, table: Table, condition: Any) -> None:
        query = select(table).where(condition)
        if self.lock:
            query = query.with_for_update()
        cache = self._cache(table)
        keys = [c.name for c in table.primary_key.columns]
        for mapping in self.conn.execute(query).mappings():
            values = dict(mapping)
            key = tuple(values[k] for k in keys)
            # A row already cached may hold unwritten changes: it stays the one we fold into.
            if cache.get(key) is None:
                cache[key] = Row(table, values, False, self._queue)

    def get(self, model: type[SQLModel], key: Key) -> Row | None:
        table: Table = model.__table__  # type: ignore[attr-defined]
        cache = self._cache(table)
        if key not in cache:
            values = self._read(table, key) if self._may_exist(table, key) else None
            cache[key] = None if values is None else Row(table, values, False, self._queue)
        return cache[key]

    def _read(self, table: Table, key: Key) -> dict[str, Any] | None:
        """One row's column values by primary key, through a statement planned once per
        table: building and compiling a SELECT per read was most of a live fold's time.
        SQLite: the driver's own cursor, with the columns' result processors."""
        conn = self.conn
        stmt, sql, names, binds, columns = _lookup(conn.dialect, table, self.lock)
        if conn.dialect.name != "sqlite":
            found = conn.execute(stmt, dict(zip(names, key, strict=True))).mappings().first()
            return None if found is None else dict(found)
        params = [
            value if bind is None else bind(value) for value, bind in zip(key, binds, strict=True)
        ]
        found = driver_call(conn, sql, params).fetchone()
        if found is None:
            return None
        return {
            name: value if convert is None or value is None else convert(value)
            for (name, convert), value in zip(columns, found, strict=True)
        }

    def _may_exist(self, table: Table, key: Key) -> bool:
        """Could the database hold this key that is not cached? Always, unless `empty`."""
        forgotten = self._forgotten
        return forgotten is None or key in forgotten.get(table.name, ())

    @property
    def knows_every_key(self) -> bool:
        """Empty at the start, nothing forgotten: every row is cached or known absent, so
        `get` never asks the database and prefetching is no use."""
        forgotten = self._forgotten
        return forgotten is not None and not any(forgotten.values())

    def peek(self, model: type[SQLModel], key: Key) -> Row | None:
        """The cached row, without reading the database."""
        return self._tables.get(model.__table__.name, {}).get(key)  # type: ignore[attr-defined]

    def get_or_create(self, model: type[SQLModel], key: Key, **fields: Any) -> Row:
        table: Table = model.__table__  # type: ignore[attr-defined]
        cache = self._cache(table)
        row = cache.get(key)
        if row is None and key not in cache:
            row = self.get(model, key)
        if row is None:
            values = _new_values(model)
            values.update(zip((c.name for c in table.primary_key.columns), key, strict=True))
            values.update(fields)
            row = Row(table, values, True, self._queue)
            cache[key] = row
        return row

    def prefetch(self, model: type[SQLModel], keys: Iterable[Key]) -> None:
        """Load the rows of `keys` not cached yet with a few IN queries on the key's first
        column (all of a search's generations, say); remember the keys that were not found."""
        table: Table = model.__table__  # type: ignore[attr-defined]
        cache = self._cache(table)
        missing = []
        for key in keys:
            if key not in cache:
                if self._may_exist(table, key):
                    missing.append(key)
                else:
                    cache[key] = None
        if not missing:
            return
        column = table.primary_key.columns[0]
        ordered = sorted({key[0] for key in missing}, key=str)
        for start in range(0, len(ordered), 500):
            self._load(table, column.in_(ordered[start : start + 500]))
        for key in missing:
            cache.setdefault(key, None)

    def __len__(self) -> int:
        """Rows cached (found or not)."""
        return sum(len(cache) for cache in self._tables.values())

    def forget(self) -> None:
        """Drop the cached rows (after a flush: the database holds every row as cached),
        keeping their keys when `empty` (so later misses still need no query)."""
        if self._queue or self._inserts:
            raise RuntimeError("Rows.forget before flush would lose unwritten rows")
        forgotten = self._forgotten
        if forgotten is not None:
            for name, cache in self._tables.items():
                forgotten.setdefault(name, set()).update(
                    key for key, row in cache.items() if row is not None
                )
            if sum(len(keys) for keys in forgotten.values()) > self._known:
                self._forgotten = None  # too many to keep: ask the database from now on
        self._tables.clear()

    def insert(self, model: type[SQLModel], values: dict[str, Any]) -> None:
        """A row that is only ever inserted (e.g. a tracking record), written at flush;
        columns missing from `values` are NULL."""
        table: Table = model.__table__  # type: ignore[attr-defined]
        names = _column_names(table)
        if len(values) < len(names):
            values = dict.fromkeys(names) | values
        self._inserts.setdefault(table.name, (table, []))[1].append(values)

    def flush(self) -> None:
        """Write every new and changed row: one executemany per table and kind."""
        inserts = {name: (table, list(rows)) for name, (table, rows) in self._inserts.items()}
        updates: dict[str, tuple[Table, list[dict[str, Any]]]] = {}
        for row in self._queue:
            target = inserts if row._new else updates
            target.setdefault(row._table.name, (row._table, []))[1].append(row._values)
            object.__setattr__(row, "_new", False)
            object.__setattr__(row, "_dirty", False)
        self._queue.clear()
        self._inserts.clear()
        for table, rows in inserts.values():
            _executemany(self.conn, table, "insert", rows)
        for table, rows in updates.values():
            _executemany(self.conn, table, "update", rows)


# Per dialect and (table, lock): the primary-key SELECT, its SQL text, the key's bind names
# and processors (in the order the SQL takes them), and (name, result processor) per column.
Lookup = tuple[Any, str, list[str], list[Any], list[tuple[str, Any]]]
_LOOKUPS: WeakKeyDictionary[Dialect, dict[tuple[str, bool], Lookup]] = WeakKeyDictionary()


def _lookup(dialect: Dialect, table: Table, lock: bool) -> Lookup:
    plans = _LOOKUPS.setdefault(dialect, {})
    plan = plans.get((table.name, lock))
    if plan is None:
        keys = {f"key_{c.name}": c for c in table.primary_key.columns}
        stmt: Any = select(table).where(
            and_(*(c == bindparam(name, type_=c.type) for name, c in keys.items()))
        )
        if lock:
            stmt = stmt.with_for_update()
        compiled = stmt.compile(dialect=dialect)
        names = list(keys)  # a key's values come in primary key order: so must the SQL's
        if compiled.positional and list(compiled.positiontup or ()) != names:
            raise RuntimeError(f"{table.name}: key parameters out of order in {compiled}")
        binds = [keys[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names]
        columns = [  # (SQLite: other drivers' result processors need the column's type code)
            (c.name, c.type.dialect_impl(dialect).result_processor(dialect, None))
            if dialect.name == "sqlite"
            else (c.name, None)
            for c in table.columns
        ]
        plan = plans[table.name, lock] = (stmt, compiled.string, names, binds, columns)
    return plan


# Per dialect and (table, kind): the statement, its SQL text, its bind names in order, a
# getter of their values from a row's columns, and (position, bind processor) of those that
# need converting.
Plan = tuple[Any, str, list[str], Any, list[tuple[int, Any]]]
_PLANS: WeakKeyDictionary[Dialect, dict[tuple[str, str], Plan]] = WeakKeyDictionary()


def _plan(dialect: Dialect, table: Table, kind: str) -> Plan:
    plans = _PLANS.setdefault(dialect, {})
    if (table.name, kind) not in plans:
        source = {c.name: c.name for c in table.columns}
        keys = {c.name for c in table.primary_key.columns}
        if kind == "insert":
            stmt: Any = table.insert().values(
                {c.name: bindparam(c.name, type_=c.type) for c in table.columns}
            )
        else:
            source.update({f"key_{name}": name for name in keys})
            where = [table.c[k] == bindparam(f"key_{k}", type_=table.c[k].type) for k in keys]
            values = {
                c.name: bindparam(c.name, type_=c.type) for c in table.columns if c.name not in keys
            }
            stmt = table.update().where(and_(*where)).values(values)
        compiled = stmt.compile(dialect=dialect)
        names = list(compiled.positiontup) if compiled.positional else list(compiled.binds)
        read = itemgetter(*(source[name] for name in names))  # rows hold every column
        converters = []
        for i, name in enumerate(names):
            type_ = compiled.binds[name].type
            processor = type_.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                # Times repeat (a row keeps its times while other columns change): each is
                # converted once.
                converters.append(
                    (i, _memoised(processor) if isinstance(type_, UTCDateTime) else processor)
                )
        plans[table.name, kind] = (stmt, compiled.string, names, read, converters)
    return plans[table.name, kind]


def _executemany(conn: Connection, table: Table, kind: str, rows: list[dict[str, Any]]) -> None:
    """SQLite: one driver-level executemany with the columns' own bind processors, because
    SQLAlchemy's per-row parameter handling costs several times SQLite's own insert. Other
    databases: SQLAlchemy's executemany, which batches rows into few round trips."""
    stmt, sql, names, read, converters = _plan(conn.dialect, table, kind)
    if conn.dialect.name != "sqlite":
        conn.execute(stmt, [dict(zip(names, read(row), strict=True)) for row in rows])
        return
    batch: list[Any] = []
    for row in rows:
        values = list(read(row))
        for i, convert in converters:
            if values[i] is not None:
                values[i] = convert(values[i])
        batch.append(
            tuple(values) if conn.dialect.positional else dict(zip(names, values, strict=True))
        )
    driver_call(conn, sql, batch, many=True)


def driver_call(conn: Connection, sql: str, params: Any = (), *, many: bool = False) -> Any:
    """Run SQL on SQLite's own connection: a tenth of exec_driver_sql's cost per statement,
    which counts when a transaction is one event's few statements. Errors are raised as
    exec_driver_sql raises them (DBAPIError, IntegrityError…), and like it, it begins the
    connection's transaction if none is open: otherwise `conn.commit()` would not commit
    what the driver wrote."""
    if not conn.in_transaction():
        conn.begin()
    driver: Any = conn.connection.dbapi_connection
    error = conn.dialect.loaded_dbapi.Error
    try:
        return driver.executemany(sql, params) if many else driver.execute(sql, params)
    except error as exc:
        raise DBAPIError.instance(sql, params, exc, error) from exc


def _memoised(processor: Any, limit: int = 4096) -> Any:
    """`processor` with its results remembered (up to `limit` values, then forgotten)."""
    seen: dict[Any, Any] = {}

    def convert(value: Any) -> Any:
        found = seen.get(value)
        if found is None:
            if len(seen) >= limit:
                seen.clear()
            found = seen[value] = processor(value)
        return found

    return convert

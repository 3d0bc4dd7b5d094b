"""Database fixtures for projection tests: a fresh SQLite file, and a fresh PostgreSQL database
per test when one is reachable at 127.0.0.1:5432 (trust auth, user postgres), else a skip.

The repo-root conftest.py registers this module as a plugin, so any test can take `db_url`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

# Override with GROUNDLOOP_TEST_POSTGRES (a server URL without the database name).
PG_SERVER = os.environ.get(
    "GROUNDLOOP_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432"
)


def _admin_engine():
    try:
        import psycopg2  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"PostgreSQL driver missing (pip install psycopg2-binary): {exc}")
    return create_engine(
        f"{PG_SERVER}/test", isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}
    )


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A uniquely named PostgreSQL database, dropped after the test."""
    admin = _admin_engine()
    name = f"gl_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # unreachable, refused, auth: all mean "no PostgreSQL here"
        admin.dispose()
        where = PG_SERVER.rsplit("@", 1)[-1]
        pytest.skip(f"PostgreSQL not reachable at {where}: {str(exc).splitlines()[0]}")
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test that takes it runs on a SQLite file, then on PostgreSQL (or is skipped)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'projections.db'}"
    return request.getfixturevalue("pg_url")

"""Stores to test against: a fresh SQLite file per test, and a fresh database per test on a real
PostgreSQL server started once for the session from the local binaries (`tests.pg`); the
PostgreSQL cases are skipped, saying why, only when no PostgreSQL binaries are installed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from aligner.store import Store
from tests.pg import NO_BINARIES, PostgresServer, pg_bin, running_postgres

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    bin_dir = pg_bin()
    if bin_dir is None:
        pytest.skip(NO_BINARIES)
    with running_postgres(bin_dir) as server:
        yield server


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def store_url(backend, tmp_path, request) -> str:
    """The URL of a fresh, empty store on each backend."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture
def store(store_url) -> Iterator[Store]:
    opened = Store.open(store_url)
    yield opened
    opened.close()

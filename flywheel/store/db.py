"""Opening the store: one SQLAlchemy engine over SQLite (default) or PostgreSQL, migrated to head.

`open_store(settings)` is the only place that connects; everything else receives the `Store` handle.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from flywheel.errors import InfrastructureError
from flywheel.settings import Settings

MIGRATIONS = Path(__file__).parent / "migrations"


@dataclass
class Store:
    engine: Engine
    settings: Settings

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A transaction: committed when the block ends, rolled back when it raises."""
        with self.engine.begin() as conn:
            yield conn

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets readers (the CLI, the gateway) work while a writer ingests; NORMAL sync is durable in WAL
    # mode against process crashes, which is what "an interrupted ingest loses nothing" needs.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(url: str, echo: bool = False) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, echo=echo, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, echo=echo, pool_pre_ping=True)


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def open_store(settings: Settings, migrate: bool = True) -> Store:
    """Connect and bring the schema to the newest migration. Raises InfrastructureError if the
    database cannot be reached, naming the URL without its password."""
    url = settings.store_url
    engine = make_engine(url, echo=settings.store.echo)
    try:
        with engine.connect() as conn:
            if migrate:
                cfg = alembic_config(url)
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
                conn.commit()
    except (OperationalError, SQLAlchemyError) as exc:
        engine.dispose()
        safe = engine.url.render_as_string(hide_password=True)
        raise InfrastructureError(f"cannot open the store at {safe}: {str(exc).splitlines()[0]}") from exc
    return Store(engine=engine, settings=settings)


def table_names(store: Store) -> list[str]:
    return sorted(inspect(store.engine).get_table_names())

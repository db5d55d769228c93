"""Shared fixtures: a project in a temporary folder, its store on real SQLite or real PostgreSQL.

PostgreSQL runs on 127.0.0.1:5432 with trust auth on these machines (and in CI). Each test session
creates its own database and drops it at the end, so parallel runs do not see each other.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
# The PostgreSQL to test on, read before the rest of the FLYWHEEL_* environment is cleared below.
PG_ADMIN_DSN = os.environ.get("FLYWHEEL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
# Tests never read a developer's own FLYWHEEL_* environment.
for _key in [k for k in os.environ if k.startswith("FLYWHEEL_")]:
    del os.environ[_key]

# imported only now: flywheel reads the environment set above when its modules load
from flywheel.context import Context  # noqa: E402
from flywheel.settings import Settings, load_settings  # noqa: E402
from flywheel.store.db import Store, open_store  # noqa: E402


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session."""
    import psycopg

    name = f"flywheel_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI"):
            raise  # CI machines have PostgreSQL: its absence is a failure there, not a skip
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_DSN}: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The agent tests' tiny causal LM (agent_helpers.build_base), built once per session and shared
    read-only: the champion v1 and the base every adapter trains on. Nothing writes into the folder;
    a test that needs to change a model copies it first."""
    from agent_helpers import build_base

    return build_base(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def tiny_model_dir_h64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny LM, on flywheel's built-in corpus (demo.tiny_model.tiny_corpus) with hidden size 64 and
    two layers: what test_models checks the builder against and test_serve_builtin serves. Shared read-only."""
    from flywheel.demo.tiny_model import build_tiny_model, tiny_corpus

    return build_tiny_model(tmp_path_factory.mktemp("tiny-h64") / "base", tiny_corpus(), vocab_size=300, hidden=64)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder as `flywheel init` leaves it: the CLI refuses a folder without flywheel.toml.
    The file is empty (every setting at its default); tests write their own settings into it."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "flywheel.toml").write_text("", encoding="utf-8")
    return folder


@pytest.fixture
def settings(project: Path) -> Settings:
    return load_settings(project)


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    handle = open_store(settings)
    yield handle
    handle.dispose()


@pytest.fixture
def ctx(settings: Settings) -> Iterator[Context]:
    context = Context(settings=settings)
    yield context
    context.close()


@pytest.fixture(params=["sqlite", "postgres"])
def any_store(request: pytest.FixtureRequest, project: Path) -> Iterator[Store]:
    """The same test on real SQLite and on real PostgreSQL."""
    if request.param == "sqlite":
        settings = load_settings(project)
    else:
        url = request.getfixturevalue("pg_url")
        settings = load_settings(project, store={"url": url})
        _truncate_all(url)
    handle = open_store(settings)
    yield handle
    handle.dispose()


def _truncate_all(url: str) -> None:
    """Empty every flywheel table so that each PostgreSQL test starts clean in the shared database."""
    from sqlalchemy import create_engine, text

    from flywheel.store.schema import metadata

    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        exists = conn.execute(text("select to_regclass('public.interactions')")).scalar()
        if exists:
            names = ", ".join(t.name for t in metadata.sorted_tables)
            conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    engine.dispose()

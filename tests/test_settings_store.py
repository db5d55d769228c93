from pathlib import Path

import pytest

from flywheel.errors import InfrastructureError, SettingsError
from flywheel.records import Interaction, Message, Signals
from flywheel.settings import load_settings
from flywheel.store import interactions as repo
from flywheel.store.db import open_store, table_names


def test_defaults_put_sqlite_under_the_state_folder(project: Path) -> None:
    s = load_settings(project)
    assert s.store_url == f"sqlite:///{project.resolve()}/.flywheel/flywheel.db"
    assert not s.llm.enabled


def test_toml_and_env_are_read_env_wins(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (project / "flywheel.toml").write_text('[triage]\nbudget = 7\n[llm]\nbase_url = "http://x/v1"\n')
    assert load_settings(project).triage.budget == 7
    monkeypatch.setenv("FLYWHEEL_TRIAGE__BUDGET", "9")
    s = load_settings(project)
    assert s.triage.budget == 9 and s.llm.base_url == "http://x/v1"


@pytest.mark.parametrize(
    "toml, key",
    [
        ("[triage]\nbudget = -1\n", "triage.budget"),
        ("[triage]\nbugdet = 3\n", "triage.bugdet"),
        ('[store]\nurl = "mysql://x"\n', "store"),
        ('[llm]\napi_key = "sk-1"\n', "llm.api_key"),
        ("[triage\n", "flywheel.toml"),
        ('[taxonomy.categories]\nnot_a_type = "safety"\n', "taxonomy"),
    ],
)
def test_a_wrong_setting_names_its_key(project: Path, toml: str, key: str) -> None:
    (project / "flywheel.toml").write_text(toml)
    with pytest.raises(SettingsError) as err:
        load_settings(project)
    assert str(err.value).startswith(f"setting {key}")
    assert "\n" not in str(err.value)


def test_migrations_create_every_table(any_store) -> None:
    names = table_names(any_store)
    for table in ("interactions", "failures", "verdicts", "corrections", "model_versions", "approvals", "jobs"):
        assert table in names


def _interaction(i: int) -> Interaction:
    return Interaction(
        id=f"i{i}",
        timestamp="2026-01-01T00:00:00Z",
        model_version="v1",
        messages=[Message(role="user", content=f"hello {i}"), Message(role="assistant", content="hi")],
        signals=Signals(feedback="down"),
        content_hash=f"h{i}",
    )


def test_interactions_round_trip_and_insert_is_idempotent(any_store) -> None:
    assert repo.insert(any_store, [_interaction(i) for i in range(3)]) == 3
    assert repo.insert(any_store, [_interaction(i) for i in range(4)]) == 1
    got = repo.get(any_store, "i2")
    assert got is not None and got.messages[0].content == "hello 2" and got.signals.feedback == "down"
    assert repo.count(any_store) == 4
    assert [i.id for i in repo.iter_all(any_store, batch=2)] == ["i0", "i1", "i2", "i3"]


def test_unreachable_postgres_is_one_clear_error(project: Path) -> None:
    s = load_settings(project, store={"url": "postgresql://nobody:secret@127.0.0.1:1/none"})
    with pytest.raises(InfrastructureError) as err:
        open_store(s)
    assert "cannot open the store" in str(err.value) and "secret" not in str(err.value)

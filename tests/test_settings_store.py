from pathlib import Path

import pytest

from flywheel.cli import main
from flywheel.errors import InfrastructureError, SettingsError
from flywheel.records import Interaction, Message, Signals
from flywheel.settings import Settings, load_settings
from flywheel.settings_env import unknown_names
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


def test_a_list_or_dict_in_the_environment_must_be_json_and_the_error_says_so(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_GATE__TARGETED", "over_promise")
    with pytest.raises(SettingsError) as err:
        load_settings(project)
    assert str(err.value) == (
        "setting gate.targeted: FLYWHEEL_GATE__TARGETED must be a JSON list, "
        """e.g. FLYWHEEL_GATE__TARGETED='["over_promise"]' (got 'over_promise')"""
    )
    monkeypatch.setenv("FLYWHEEL_GATE__TARGETED", '["over_promise"]')
    assert load_settings(project).gate.targeted == ["over_promise"]

    monkeypatch.setenv("FLYWHEEL_RULES__WEIGHTS", "qa_reject=5")
    with pytest.raises(SettingsError, match=r"^setting rules.weights: FLYWHEEL_RULES__WEIGHTS must be a JSON object"):
        load_settings(project)
    monkeypatch.delenv("FLYWHEEL_RULES__WEIGHTS")
    monkeypatch.setenv("FLYWHEEL_RULES__WEIGHTS__QA_REJECT", "7")  # one key of a dict, as plain text
    monkeypatch.setenv("FLYWHEEL_TRAIN__TARGET_MODULES", "all-linear")  # a list, or this one word
    s = load_settings(project)
    assert s.rules.weights["qa_reject"] == 7.0 and s.train.target_modules == "all-linear"
    monkeypatch.setenv("FLYWHEEL_TRAIN__TARGET_MODULES", "q_proj,v_proj")
    with pytest.raises(SettingsError, match=r"""JSON list or all-linear, e.g. FLYWHEEL_TRAIN__TARGET_MODULES='\["q_proj", "v_proj"\]'"""):
        load_settings(project)


def test_unknown_flywheel_variables_are_warned_about_with_the_close_match(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    read_directly = {
        "FLYWHEEL_LLM_API_KEY": "sk-1",
        "FLYWHEEL_CONFIG": "",
        "FLYWHEEL_PROJECT_DIR": "",
        "FLYWHEEL_UPSTREAM_API_KEY": "k",
        "FLYWHEEL_TEST_PAUSE_AT": "",
        "FLYWHEEL_TEST_PAUSE_FILE": "",
        "FLYWHEEL_TEST_PAUSE_SECONDS": "",
        "FLYWHEEL_TEST_PG": "",
    }
    settings_names = {
        "FLYWHEEL_STORE__URL": "",
        "flywheel_triage__budget": "3",
        "FLYWHEEL_SERVE__ADAPTER_PATH_MAP__/a": "/b",
        "FLYWHEEL_STATE_DIR": "",
    }
    assert unknown_names(Settings, {**read_directly, **settings_names, "PATH": "/bin"}) == []
    assert unknown_names(Settings, {"FLYWHEEL_WIDGETS": "1"}) == [
        "warning: FLYWHEEL_WIDGETS matches no setting and is ignored (nested keys use two underscores: FLYWHEEL_STORE__URL)"
    ]

    monkeypatch.setenv("FLYWHEEL_STORE_URL", "postgresql://db/flywheel")
    monkeypatch.setenv("FLYWHEEL_LLM_API_KEY", "sk-1")
    s = load_settings(project)
    assert s.store_url.startswith("sqlite:")  # ignored, as the warning says
    assert capsys.readouterr().err == ("warning: FLYWHEEL_STORE_URL matches no setting and is ignored; did you mean FLYWHEEL_STORE__URL?\n")
    load_settings(project)
    assert capsys.readouterr().err == ""  # once per process, not at every load
    monkeypatch.setenv("FLYWHEEL_TRIAGE_BUDGET", "5")  # and through the CLI
    assert main(["-C", str(project), "failures", "counts", "--json"]) == 0
    assert (
        capsys.readouterr().err
        == "warning: FLYWHEEL_TRIAGE_BUDGET matches no setting and is ignored; did you mean FLYWHEEL_TRIAGE__BUDGET?\n"
    )


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

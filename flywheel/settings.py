"""One settings object: `flywheel.toml` plus `FLYWHEEL_*` environment variables.

Built once in the CLI's `main()` (or by a test) and passed down; nothing reads the environment later.
Nested keys use `__` in the environment: `FLYWHEEL_STORE__URL=postgresql://...`,
`FLYWHEEL_LLM__BASE_URL=http://127.0.0.1:8000/v1`. The LLM API key is read from the environment only
(`FLYWHEEL_LLM_API_KEY` or `OPENAI_API_KEY`); a key written in the TOML file is refused.

A wrong setting becomes one `SettingsError` line naming the key and what was expected; a list or table
given as plain text in the environment names the JSON form it needs, and a FLYWHEEL_ variable that
matches no setting is warned about on stderr (flywheel.settings_env).

The sections (`[train]`, `[gate]`, ...) are flywheel.settings_sections; this module
assembles and loads them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from flywheel.errors import SettingsError
from flywheel.settings_env import check_values, unknown_names
from flywheel.settings_sections import (
    AgentSettings,
    ApprovalSettings,
    CanarySettings,
    ChromaSettings,
    ConsoleSettings,
    CorrectSettings,
    DaemonSettings,
    DatasetSettings,
    EvalSettings,
    GateSettings,
    GraduationSettings,
    JudgeSettings,
    LLMSettings,
    LoopSettings,
    PolicySettings,
    RaySettings,
    RuleSettings,
    SelectionSettings,
    ServeSettings,
    SlackSettings,
    StoreSettings,
    SynthesisSettings,
    TaxonomySettings,
    TrainSettings,
    TriageSettings,
)

CONFIG_FILE = "flywheel.toml"
STATE_DIR = ".flywheel"

SEVERITIES: tuple[str, ...] = ("low", "medium", "high", "critical")  # records.Severity, in rank order


class Settings(BaseSettings):
    """Everything flywheel reads, in one place."""

    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", env_nested_delimiter="__", extra="forbid", toml_file=None)

    project_dir: Path = Path(".")
    state_dir: str = STATE_DIR  # relative to project_dir
    store: StoreSettings = StoreSettings()
    chroma: ChromaSettings = ChromaSettings()
    llm: LLMSettings = LLMSettings()
    rules: RuleSettings = RuleSettings()
    triage: TriageSettings = TriageSettings()
    taxonomy: TaxonomySettings = TaxonomySettings()
    policies: PolicySettings = PolicySettings()
    judge: JudgeSettings = JudgeSettings()
    correct: CorrectSettings = CorrectSettings()
    dataset: DatasetSettings = DatasetSettings()
    selection: SelectionSettings = SelectionSettings()
    synthesis: SynthesisSettings = SynthesisSettings()
    train: TrainSettings = TrainSettings()
    ray: RaySettings = RaySettings()
    gate: GateSettings = GateSettings()
    eval: EvalSettings = EvalSettings()
    canary: CanarySettings = CanarySettings()
    graduation: GraduationSettings = GraduationSettings()
    approvals: ApprovalSettings = ApprovalSettings()
    agent: AgentSettings = AgentSettings()
    loop: LoopSettings = LoopSettings()
    daemon: DaemonSettings = DaemonSettings()
    slack: SlackSettings = SlackSettings()
    serve: ServeSettings = ServeSettings()
    console: ConsoleSettings = ConsoleSettings()

    @field_validator("store")
    @classmethod
    def _store_url(cls, value: StoreSettings) -> StoreSettings:
        if value.url and not value.url.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:", "postgres:")):
            raise ValueError("expected a sqlite:/// or postgresql:// URL")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file; explicit arguments (tests) beat both.
        toml_path = os.environ.get("FLYWHEEL_CONFIG") or _toml_path_hint.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_path and Path(toml_path).is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    # --- derived locations -------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return (self.project_dir / self.state_dir).resolve()

    @property
    def store_url(self) -> str:
        if self.store.url:
            url = self.store.url
            if url.startswith("postgres://"):
                url = "postgresql://" + url[len("postgres://") :]
            if url.startswith("postgresql://"):
                url = "postgresql+psycopg://" + url[len("postgresql://") :]
            return url
        return f"sqlite:///{self.state_path / 'flywheel.db'}"

    @property
    def is_postgres(self) -> bool:
        return self.store_url.startswith("postgresql")

    @property
    def chroma_path(self) -> Path:
        return Path(self.chroma.path) if self.chroma.path else self.state_path / "chroma"

    @property
    def artifacts_path(self) -> Path:
        return self.state_path / "artifacts"

    @property
    def quarantine_path(self) -> Path:
        return self.state_path / "quarantine.jsonl"

    @property
    def llm_api_key(self) -> str:
        return os.environ.get("FLYWHEEL_LLM_API_KEY") or os.environ.get("OPENAI_API_KEY") or "not-needed"


class _TomlPathHint:
    """The TOML path for the current load: pydantic-settings builds sources from the class, so the
    path found by `load_settings` reaches `settings_customise_sources` through here."""

    def __init__(self) -> None:
        self._path: str | None = None

    def get(self) -> str | None:
        return self._path

    def set(self, path: str | None) -> None:
        self._path = path


_toml_path_hint = _TomlPathHint()


def load_settings(project_dir: Path | str | None = None, **overrides: Any) -> Settings:
    """Read `flywheel.toml` from `project_dir` (default: the current folder) and the environment.

    Raises SettingsError with the first wrong key, dotted, and what was expected.
    """
    project = Path(project_dir or os.environ.get("FLYWHEEL_PROJECT_DIR") or ".").resolve()
    toml_file = project / CONFIG_FILE
    if "api_key" in _read_toml_keys(toml_file):
        raise SettingsError("llm.api_key", "an API key may not be written in flywheel.toml; set FLYWHEEL_LLM_API_KEY")
    check_values(Settings, os.environ)
    _warn_unknown(os.environ)
    _toml_path_hint.set(str(toml_file) if toml_file.is_file() else None)
    try:
        return Settings(project_dir=project, **overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        raise SettingsError(key, f"{err['msg']} (got {err.get('input')!r})".replace("\n", " ")) from None
    except ValueError as exc:  # a TOML syntax error surfaces as a ValueError subclass
        raise SettingsError(CONFIG_FILE, str(exc).splitlines()[0]) from None
    finally:
        _toml_path_hint.set(None)


_warned: set[str] = set()


def _warn_unknown(environ: Mapping[str, str]) -> None:
    """One stderr line per ignored FLYWHEEL_ variable, once per process (settings load more than once)."""
    for line in unknown_names(Settings, environ):
        if line not in _warned:
            _warned.add(line)
            print(line, file=sys.stderr)


def _read_toml_keys(path: Path) -> set[str]:
    import tomllib

    if not path.is_file():
        return set()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(CONFIG_FILE, f"not valid TOML: {exc}") from None
    return {key for section in data.values() if isinstance(section, dict) for key in section}

"""The FLYWHEEL_* environment, checked before pydantic-settings reads it.

pydantic-settings handles two common slips badly:
- a list or table setting given as plain text (FLYWHEEL_GATE__TARGETED=over_promise) fails with
  "error parsing value for field 'gate'", naming neither the key nor the form it wants: `check_values`
  names both, with the user's own value in that form;
- a name that matches no setting (FLYWHEEL_STORE_URL, one underscore) is silently ignored:
  `unknown_names` finds those, with the closest real name.
"""

from __future__ import annotations

import difflib
import json
import types
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from flywheel.errors import SettingsError

PREFIX = "FLYWHEEL_"
NESTED = "__"

# Read by the code itself, not through Settings (grep for os.environ), or named by the docs: not unknown.
DIRECT = frozenset(
    {
        "FLYWHEEL_LLM_API_KEY",  # settings.Settings.llm_api_key
        "FLYWHEEL_CONFIG",  # settings: the TOML file to read instead of <project>/flywheel.toml
        "FLYWHEEL_PROJECT_DIR",  # settings and cli: the project folder
        "FLYWHEEL_UPSTREAM_API_KEY",  # commands/serve.py: the proxy's upstream key
        "FLYWHEEL_TEST_PAUSE_AT",
        "FLYWHEEL_TEST_PAUSE_FILE",
        "FLYWHEEL_TEST_PAUSE_SECONDS",  # agent/graph.py test hook
        "FLYWHEEL_TEST_PG",  # tests/conftest.py: the PostgreSQL the tests use
        "FLYWHEEL_KEY",  # not read: the gateway API key docs/serving.md's curl examples take from the shell
    }
)


def _fields(model: type[BaseModel], prefix: str = PREFIX, dotted: str = "") -> dict[str, tuple[str, Any]]:
    """Every environment name a settings model reads: NAME -> (dotted key, annotation). Sections are
    walked one level down, as pydantic-settings splits names on `__`."""
    found: dict[str, tuple[str, Any]] = {}
    for name, field in model.model_fields.items():
        env, key = f"{prefix}{name.upper()}", f"{dotted}{name}"
        found[env] = (key, field.annotation)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found.update(_fields(field.annotation, env + NESTED, key + "."))
    return found


def _arms(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) in (Union, types.UnionType):
        return tuple(a for a in get_args(annotation) if a is not type(None))
    return (annotation,)


def _json_form(annotation: Any) -> tuple[str | None, tuple[str, ...]]:
    """('list' | 'object' | None, plain values also accepted). A list or table setting must come as JSON;
    a union with a Literal (train.target_modules: a list or "all-linear") also takes the Literal's values."""
    form: str | None = None
    plain: list[str] = []
    for arm in _arms(annotation):
        origin = get_origin(arm) or arm
        if origin in (list, set, tuple):
            form = form or "list"
        elif origin is dict or (isinstance(origin, type) and issubclass(origin, BaseModel)):
            form = form or "object"
        elif origin is Literal:
            plain.extend(str(v) for v in get_args(arm))
        else:
            return None, ()  # a plain str, number or path arm takes any text
    return form, tuple(plain)


def _example(form: str, value: str) -> str:
    if form == "list":
        items = [v.strip() for v in value.strip("[]").split(",") if v.strip()] or ["..."]
        return json.dumps(items)
    return '{"key": "value"}'


def check_values(settings_cls: type[BaseModel], environ: Mapping[str, str]) -> None:
    """Raise SettingsError for a list or table setting whose environment value is not JSON."""
    known = _fields(settings_cls)
    for raw_name, value in environ.items():
        name = raw_name.upper()
        if name not in known:
            continue
        key, annotation = known[name]
        form, plain = _json_form(annotation)
        if form is None or value in plain:
            continue
        try:
            json.loads(value)
        except ValueError:
            also = f" or {' | '.join(plain)}" if plain else ""
            raise SettingsError(
                key, f"{raw_name} must be a JSON {form}{also}, e.g. {raw_name}='{_example(form, value)}' (got {value!r})"
            ) from None


def unknown_names(settings_cls: type[BaseModel], environ: Mapping[str, str]) -> list[str]:
    """One line per FLYWHEEL_ variable that no setting and no part of the code reads, with the closest
    real name when there is one."""
    known = _fields(settings_cls)
    # keys inside a dict setting (FLYWHEEL_RULES__WEIGHTS__QA_REJECT) are the user's own names; a wrong
    # key inside a section is already an error (sections forbid extra keys)
    tables = tuple(n + NESTED for n, (_k, a) in known.items() if any(get_origin(arm) is dict for arm in _arms(a)))
    # compared without the prefix, which every name shares and which would make any two names "close"
    names = {n[len(PREFIX) :]: n for n in sorted(set(known) | DIRECT)}
    lines = []
    for raw_name in sorted(environ):
        name = raw_name.upper()
        if not name.startswith(PREFIX) or name in known or name in DIRECT or name.startswith(tables):
            continue
        close = difflib.get_close_matches(name[len(PREFIX) :], list(names), n=1, cutoff=0.8)
        hint = f"; did you mean {names[close[0]]}?" if close else " (nested keys use two underscores: FLYWHEEL_STORE__URL)"
        lines.append(f"warning: {raw_name} matches no setting and is ignored{hint}")
    return lines

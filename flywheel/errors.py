"""The few error types, each saying who sees it and which exit status the CLI gives it.

Two kinds of error (ARCHITECTURE principle 6): mistakes made by a model or a tool caller go back to the
agent as observations (`ToolInputError`); broken infrastructure raises (`InfrastructureError`) and stops
the run with a resumable checkpoint. Bad user input is a `UserInputError`: a one-line message naming
what was wrong and where.
"""

from __future__ import annotations


class FlywheelError(Exception):
    """Base class. `exit_code` is what the CLI exits with when this reaches it."""

    exit_code = 1


class UserInputError(FlywheelError):
    """A file, a flag or a request from the user is wrong. The user sees the message and fixes it."""

    exit_code = 2


class SettingsError(UserInputError):
    """A setting is wrong. The message names the key and what was expected."""

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"setting {key}: {problem}")


class NotFoundError(UserInputError):
    """An id given by the user or the agent names nothing in the store."""

    exit_code = 3


class ToolInputError(FlywheelError):
    """A tool was called with bad arguments. The agent sees this as an observation and may retry."""

    exit_code = 2


class InfrastructureError(FlywheelError):
    """A store, index, model or endpoint is broken. The run stops; the checkpoint stays resumable."""

    exit_code = 4


class PolicyViolation(FlywheelError):
    """Something tried to skip a gate or act without an approval. Never retried, always recorded."""

    exit_code = 5


class JobFailed(FlywheelError):
    """A training or evaluation job failed. The message says where its log is."""

    exit_code = 6

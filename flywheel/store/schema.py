"""The SQL schema, one SQLAlchemy Core table per kind of record.

Core rather than the ORM: ingest writes tens of thousands of rows a second with executemany, and the
records that travel between stages are pydantic models (flywheel.records), not mapped classes.
Migrations live in store/migrations (Alembic); `flywheel.store.db.open_store` upgrades to head.
JSON columns hold lists and nested records; they are plain JSON on SQLite and JSONB-compatible JSON on
PostgreSQL.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    text,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

TS = DateTime(timezone=True)

# --- the data path ----------------------------------------------------------------------------------------

interactions = Table(
    "interactions",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("content_hash", String(64), nullable=False, unique=True),
    Column("timestamp", TS, nullable=False),
    Column("model_version", String(200), nullable=False),
    Column("intent", String(200)),
    Column("user_id", String(200)),
    Column("user_tier", String(100)),
    Column("messages", JSON, nullable=False),
    Column("feedback", String(8)),
    Column("escalated_to_human", Boolean, nullable=False, default=False),
    Column("followups", Integer, nullable=False, default=0),
    Column("qa_verdict", String(8)),
    Column("complaint", Text),
    Column("source", String(500), nullable=False, default=""),
    Column("latency_ms", Float),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("ingested_at", TS, nullable=False),
    Index("ix_interactions_version_ts", "model_version", "timestamp"),
    Index("ix_interactions_ingested", "ingested_at"),
)

failures = Table(
    "failures",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("interaction_id", String(200), ForeignKey("interactions.id"), nullable=False, unique=True),
    Column("rule", String(100), nullable=False),
    Column("rules", JSON, nullable=False),
    Column("risk", Float, nullable=False, default=0.0),
    Column("first_seen_version", String(200), nullable=False),
    Column("intent", String(200)),
    Column("status", String(32), nullable=False),
    Column("cluster_id", String(64)),
    Column("cluster_size", Integer, nullable=False, default=1),
    Column("tier", String(32), nullable=False, default="problem"),
    Column("weight", Float, nullable=False, default=1.0),
    Column("captured_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    Index("ix_failures_status", "status"),
    Index("ix_failures_tier", "tier"),
    # the console's failure filters and its risk-ordered pages (migration 0003)
    Index("ix_failures_risk", "risk"),
    Index("ix_failures_intent", "intent"),
    Index("ix_failures_rule", "rule"),
    Index("ix_failures_first_seen_version", "first_seen_version"),
)

verdicts = Table(
    "verdicts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("failure_id", String(64), ForeignKey("failures.id"), nullable=False, index=True),
    Column("status", String(16), nullable=False),  # judged | unjudged
    Column("is_failure", Boolean, nullable=False),
    Column("problem_type", String(100), index=True),  # the console's problem-type filter (migration 0003)
    Column("severity", String(16)),
    Column("acceptance", String(8)),
    Column("rationale", Text, nullable=False, default=""),
    Column("reason", Text, nullable=False, default=""),
    Column("judge", String(200), nullable=False),
    Column("prompt_version", String(100), nullable=False, default=""),
    Column("created_at", TS, nullable=False),
)

corrections = Table(
    "corrections",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("failure_id", String(64), ForeignKey("failures.id"), nullable=False, index=True),
    Column("answer", Text, nullable=False),
    Column("generator", String(200), nullable=False),
    Column("prompt_version", String(100), nullable=False, default=""),
    Column("context_ids", JSON, nullable=False),
    Column("verified", Boolean, nullable=False, default=False),
    Column("verification", JSON),
    Column("created_at", TS, nullable=False),
)

labels = Table(  # human labels: count against the labelling budget
    "labels",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("failure_id", String(64), ForeignKey("failures.id"), nullable=False, index=True),
    Column("label", JSON, nullable=False),
    Column("labeller", String(200), nullable=False),
    Column("created_at", TS, nullable=False),
)

tier_moves = Table(  # sample graduation history
    "tier_moves",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("failure_id", String(64), ForeignKey("failures.id"), nullable=False, index=True),
    Column("from_tier", String(32), nullable=False),
    Column("to_tier", String(32), nullable=False),
    Column("weight", Float),
    Column("version", String(64)),
    Column("actor", String(200), nullable=False),
    Column("reason", Text, nullable=False, default=""),
    Column("created_at", TS, nullable=False),
)

synthetic_samples = Table(  # flywheel.synthesis: every generated sample, kept or dropped, with its provenance
    "synthetic_samples",
    metadata,
    Column("id", String(64), primary_key=True),  # a hash of generator, params, source, prompt, answer, kind
    Column("generator", String(32), nullable=False),
    Column("params", JSON, nullable=False),
    Column("source_id", String(200)),
    Column("intent", String(200), nullable=False),
    Column("problem_type", String(64), nullable=False),
    Column("kind", String(32), nullable=False),  # reply | tool_choice | tool_arguments | tool_reply
    Column("messages", JSON, nullable=False),
    Column("answer", Text, nullable=False),
    Column("rejected", Text),  # the failing answer it corrects, if any
    Column("scores", JSON, nullable=False),
    Column("kept", Boolean, nullable=False),
    Column("reasons", JSON, nullable=False),  # why it was dropped; empty when kept
    Column("created_at", TS, nullable=False),
    Column("scored_at", TS, nullable=False),  # a re-run scores again against the pool of its day
    Index("ix_synthetic_samples_kept_intent", "kept", "intent"),
)

# --- training, evaluation, release ------------------------------------------------------------------------

datasets = Table(
    "datasets",
    metadata,
    Column("id", String(64), primary_key=True),  # derived from content hash
    Column("kind", String(8), nullable=False),  # sft | dpo
    Column("path", Text, nullable=False),
    Column("content_hash", String(64), nullable=False),
    Column("manifest", JSON, nullable=False),
    Column("created_at", TS, nullable=False),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(64), primary_key=True),  # derived from the job's inputs
    Column("kind", String(32), nullable=False),  # train_sft | train_dpo | eval
    Column("status", String(16), nullable=False),  # queued | running | succeeded | failed | killed
    Column("spec", JSON, nullable=False),
    Column("launcher", String(32), nullable=False, default="local"),
    Column("pid", Integer),
    Column("work_dir", Text, nullable=False),
    Column("log_path", Text, nullable=False),
    Column("progress", JSON),
    Column("result", JSON),
    Column("error", Text),
    Column("attempts", Integer, nullable=False, default=0),
    Column("created_at", TS, nullable=False),
    Column("started_at", TS),
    Column("finished_at", TS),
    Column("heartbeat_at", TS),
)

model_versions = Table(
    "model_versions",
    metadata,
    Column("id", String(64), primary_key=True),  # v1, v2, ...
    Column("parent", String(64)),
    Column("base_model", Text, nullable=False),
    Column("adapter_path", Text),  # null: the base model itself
    Column("adapter_sha256", String(64)),
    Column("dataset_id", String(64)),
    Column("job_id", String(64)),
    Column("eval_report_path", Text),
    Column("eval_report_hash", String(64)),
    Column("gate_passed", Boolean),
    Column("status", String(16), nullable=False),  # candidate | canary | champion | previous | retired | rejected | rolled_back
    Column("metrics", JSON),
    Column("notes", Text, nullable=False, default=""),
    Column("created_at", TS, nullable=False),
)

aliases = Table(
    "aliases",
    metadata,
    Column("name", String(32), primary_key=True),  # champion | canary | previous
    Column("version", String(64), nullable=False),
    Column("share", Float),  # canary's traffic share
    Column("updated_at", TS, nullable=False),
)

alias_events = Table(
    "alias_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("effect_key", String(128), nullable=False, unique=True),  # a second switch with the same key is a no-op
    Column("alias", String(32), nullable=False),
    Column("from_version", String(64)),
    Column("to_version", String(64)),
    Column("reason", Text, nullable=False, default=""),
    Column("actor", String(200), nullable=False),
    Column("created_at", TS, nullable=False),
)

approvals = Table(
    "approvals",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("version", String(64), nullable=False),
    Column("report_hash", String(64), nullable=False),
    Column("decision", String(16), nullable=False),  # approved | rejected
    Column("approver", String(200), nullable=False),
    Column("channel", String(32), nullable=False),  # terminal | slack | api
    Column("reason", Text, nullable=False, default=""),
    Column("run_id", String(64)),
    Column("created_at", TS, nullable=False),
    UniqueConstraint("version", "report_hash", name="uq_approvals_version_report"),
)

canary_events = Table(
    "canary_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("version", String(64), nullable=False, index=True),
    Column("kind", String(32), nullable=False),  # started | observation | rolled_back | ended
    Column("detail", JSON, nullable=False),
    Column("created_at", TS, nullable=False),
)

# --- the agent ---------------------------------------------------------------------------------------------

runs = Table(
    "runs",
    metadata,
    Column("id", String(64), primary_key=True),  # also the LangGraph thread id
    Column("trigger", String(32), nullable=False),  # chat | run | schedule | demo
    Column("state", String(32), nullable=False),  # running | waiting_approval | done | failed | stopped
    Column("policy", String(16), nullable=False),
    Column("summary", JSON),
    Column("pending", JSON),  # the approval payload while waiting
    Column("error", Text),
    Column("pid", Integer),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
)

effects = Table(  # idempotency keys of external effects (Slack messages, launches, ...)
    "effects",
    metadata,
    Column("key", String(200), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("result", JSON),
    Column("created_at", TS, nullable=False),
)

# --- the gateway -------------------------------------------------------------------------------------------

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("revoked", Boolean, nullable=False, default=False),
    Column("created_at", TS, nullable=False),
)

feedback_events = Table(
    "feedback_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("interaction_id", String(200), nullable=False, index=True),
    Column("kind", String(32), nullable=False),
    Column("value", JSON),
    Column("client", String(200)),
    Column("created_at", TS, nullable=False),
    # applied to its interaction yet (flywheel.store.feedback): only the transaction that turns it true applies it
    Column("applied", Boolean, nullable=False, default=False, server_default=false()),
    # the sweep's way to the events still waiting, a small part of the table: only those are indexed
    Index("ix_feedback_events_waiting", "id", postgresql_where=text("NOT applied"), sqlite_where=text("applied = 0")),
)

# --- the web console (flywheel.console) -----------------------------------------------------------------------

console_users = Table(  # people who log in to the console: a name and the sha256 of their token
    "console_users",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("revoked", Boolean, nullable=False, default=False),
    Column("created_at", TS, nullable=False),
)

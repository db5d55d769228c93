"""The sections of the settings: one pydantic model per `[table]` of flywheel.toml.

flywheel.settings assembles them into `Settings` and loads it from the file and the environment. Each
section refuses unknown keys, so a typo is an error rather than a silently ignored setting.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flywheel.records import Severity


class Section(BaseModel):
    # A typo in a key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")


class StoreSettings(Section):
    url: str = ""  # empty: sqlite:///<state_dir>/flywheel.db
    echo: bool = False


class ChromaSettings(Section):
    path: str = ""  # empty: <state_dir>/chroma ; used when host is empty
    host: str = ""  # a Chroma server (HttpClient) when set
    port: int = 8000
    ssl: bool = False


class LLMSettings(Section):
    base_url: str = ""  # empty: no endpoint, the offline heuristic/rule/KB parts run
    judge_model: str = "gpt-4o-mini"
    corrector_model: str = "gpt-4o-mini"
    verifier_model: str = "gpt-4o-mini"
    supervisor_model: str = "gpt-4o-mini"
    temperature: float = 0.0
    max_in_flight: int = Field(8, ge=1, le=512)
    max_retries: int = Field(3, ge=0, le=20)
    timeout_s: float = Field(60.0, gt=0)
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(20.0, ge=0)

    @property
    def enabled(self) -> bool:
        return bool(self.base_url)


class RuleSettings(Section):
    """Which signals make a failure candidate, and how risky each rule is (weights for sampling)."""

    thumbs_down: bool = True
    escalation: bool = True
    followups_min: int = Field(2, ge=1)  # repeated follow-ups >= this
    qa_verdicts: list[Literal["Reject", "Risk"]] = ["Reject", "Risk"]
    complaint: bool = True
    high_value_tiers: list[str] = ["enterprise", "premium", "vip"]
    # Risk weight per rule name; sampling takes the highest first.
    weights: dict[str, float] = {
        "qa_reject": 5.0,
        "high_value_negative": 4.0,
        "complaint": 3.5,
        "escalation": 3.0,
        "qa_risk": 2.5,
        "repeated_followups": 2.0,
        "thumbs_down": 1.0,
    }
    high_value_multiplier: float = Field(2.0, ge=1.0)


class TriageSettings(Section):
    budget: int = Field(2000, ge=1)  # failure clusters sent to the judge per triage
    # candidates with risk >= this are always taken first (up to the budget), the rest are sampled
    must_take_risk: float = 3.0
    seed: int = 0
    dedup_threshold: float = Field(0.92, gt=0, le=1)  # cosine similarity that makes two failures one cluster


class TaxonomySettings(Section):
    problem_types: dict[str, str] = {
        "wrong_intent": "the answer addresses a different request than the user's",
        "format_error": "the answer does not follow the required output format",
        "over_promise": "the answer promises something policy does not allow (refunds, timelines, fees waived)",
        "policy_boundary_risk": "the answer crosses or nears a policy boundary (advice, disclosure, safety)",
        "missing_knowledge": "the answer lacks facts the knowledge base has",
        "wrong_tool_call": "a tool call is malformed, unknown, or the wrong tool",
    }
    # Loss-weight category of each problem type (dataset building uses it).
    categories: dict[str, str] = {
        "policy_boundary_risk": "safety",
        "over_promise": "safety",
        "wrong_intent": "reasoning",
        "missing_knowledge": "reasoning",
        "wrong_tool_call": "reasoning",
        "format_error": "format",
    }
    default_severity: dict[str, Severity] = {
        "policy_boundary_risk": "high",
        "over_promise": "high",
        "wrong_intent": "medium",
        "missing_knowledge": "medium",
        "wrong_tool_call": "medium",
        "format_error": "low",
    }

    @model_validator(mode="after")
    def _known_types(self) -> TaxonomySettings:
        for table in ("categories", "default_severity"):
            for name in getattr(self, table):
                if name not in self.problem_types:
                    raise ValueError(f"{table} names {name!r}, which is not in problem_types")
        return self


class PolicyPattern(Section):
    name: str
    pattern: str  # a regular expression, matched case-insensitively
    problem_type: str = "policy_boundary_risk"
    severity: Severity = "high"


class PolicySettings(Section):
    """What the rule judge checks in every assistant answer."""

    # JSON schema the assistant's final answer must follow; empty: free text.
    output_schema: dict[str, Any] = {}
    forbidden_phrases: list[PolicyPattern] = [
        PolicyPattern(name="guaranteed_refund", pattern=r"\b(guarantee|promise)\w*\b.{0,40}\brefund", problem_type="over_promise"),
        PolicyPattern(name="fee_waiver_promise", pattern=r"\bwe will waive\b|\bfee(s)? will be waived\b", problem_type="over_promise"),
    ]
    # Tools the agent in production may call, by name; empty: tool calls are not checked.
    allowed_tools: list[str] = []
    max_message_chars: int = Field(32_000, ge=100)


class JudgeSettings(Section):
    llm_retries: int = Field(2, ge=0, le=10)  # re-asks after an unparsable or out-of-taxonomy verdict
    prompt: str = "judge"
    # How the LLM judge asks for its verdict object: response_format json_schema, or a forced tool call
    # (for OpenAI-compatible servers without json_schema support).
    structured_output: Literal["json_schema", "function_calling"] = "json_schema"
    rationale_max_chars: int = Field(600, ge=50, le=10_000)


class CorrectSettings(Section):
    prompt: str = "corrector"
    verifier_prompt: str = "verifier"
    context_docs: int = Field(4, ge=0, le=50)
    similar_failures: int = Field(3, ge=0, le=50)
    llm_retries: int = Field(2, ge=0, le=10)  # re-asks after an unparsable or empty answer or preference
    # Without a knowledge-base answer, the offline corrector takes an intent's usual stable production
    # reply (flywheel.data.replies) only when at least this many stable answers give exactly that reply.
    reply_min_support: int = Field(3, ge=1)


class DatasetSettings(Section):
    intent_max_ratio: float = Field(0.2, gt=0, le=1)
    intent_min_samples: int = Field(50, ge=0)
    problem_type_max_ratio: float = Field(0.5, gt=0, le=1)  # down-sample over-represented failure types
    oversample_severities: list[Severity] = ["high", "critical"]
    max_repeats: int = Field(3, ge=1)  # over-sampling limit per row
    loss_weights: dict[str, float] = {"safety": 3.0, "reasoning": 1.5, "format": 0.5}
    replay_min_share: float = Field(0.05, ge=0, le=1)  # share of new problem samples in a snapshot
    replay_max_share: float = Field(0.20, ge=0, le=1)
    tier_weights: dict[str, float] = {"core_baseline": 3.0, "secondary_baseline": 2.0, "candidate_baseline": 1.0}
    heldout_ratio: float = Field(0.1, ge=0, lt=1)
    # stable production answers offered as candidate_baseline replay (SFT); 0 turns it off
    production_replay_rows: int = Field(2000, ge=0)
    format: Literal["jsonl", "parquet"] = "jsonl"
    seed: int = 0
    # A high-risk problem type holding less than this share of the problem rows is "rare": its rows of an
    # oversample severity are repeated (each at most max_repeats times) toward this share.
    oversample_target_ratio: float = Field(0.1, gt=0, le=1)
    # The share of problem rows a snapshot aims at when there is enough replay; empty: the middle of
    # [replay_min_share, replay_max_share].
    replay_target_share: float | None = Field(None, gt=0, le=1)
    # A snapshot that turns fewer than this share of the failures people labelled into rows is refused
    # (the error lists why each was left out), once at least label_yield_min_labels were labelled:
    # many labels and almost no rows means the labels were wasted, which must not pass as a success.
    min_label_yield: float = Field(0.25, ge=0, le=1)
    # Which replay rows a snapshot draws (flywheel.trainer.replay_mix.mix_replay): "weighted" by tier weight
    # alone; "counter": per intent, most to the intents the problem rows correct away from, so the
    # fix does not teach the model to avoid an intent everywhere; "boundary": "counter", and first the
    # boundary_neighbours replay rows of other intents nearest each problem row (by embedding).
    replay_strategy: Literal["weighted", "counter", "boundary"] = "counter"
    boundary_neighbours: int = Field(3, ge=1, le=50)
    label_yield_min_labels: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _shares(self) -> DatasetSettings:
        if self.replay_min_share > self.replay_max_share:
            raise ValueError("replay_min_share must not exceed replay_max_share")
        return self


class SynthesisSettings(Section):
    """flywheel.synthesis: generators, the quality scorer's thresholds, and how generated samples enter a snapshot."""

    # the supervisor's heuristic policy calls `synthesize` after the corrections when this is on
    enabled: bool = False
    generators: list[str] = ["mining", "augment", "template", "knowledge", "toolcalls", "llm"]  # llm: only with llm.base_url
    seed: int = 0
    # an intent (or problem type) with fewer verified samples than this wants generated ones, up to it
    min_verified: int = Field(20, ge=1)
    per_seed: int = Field(3, ge=1, le=50)  # augment: variants per verified sample
    per_intent: int = Field(40, ge=1)  # template, llm: new samples per intent that wants them
    templates: str = ""  # a JSONL file of slot templates {"intent", "template", "answer"?}; relative to the project
    # mining: pseudo-label an unlabelled query only when its mining_k nearest verified samples give one
    # intent at least mining_agreement of the (similarity-weighted) vote and the nearest is this close
    mining_k: int = Field(5, ge=1, le=50)
    mining_agreement: float = Field(0.6, gt=0.5, le=1)
    mining_min_similarity: float = Field(0.6, ge=0, le=1)
    # the scorer
    dedupe_threshold: float = Field(0.985, gt=0, le=1)  # cosine to the source or the pool at or above this: a duplicate
    drift_floor: float = Field(0.5, ge=0, lt=1)  # cosine to the source below this: drifted off the intent
    leak_threshold: float = Field(0.92, gt=0, le=1)  # cosine to a fixed-test-set prompt at or above this: leakage
    knn_k: int = Field(5, ge=1, le=50)  # label consistency: the intent the k nearest verified samples vote for
    max_perplexity: float = Field(1000.0, gt=1)  # of the answer under the champion: above, garbage
    min_perplexity: float = Field(1.0, ge=1)  # below: a copy of what the champion already says (1.0: off)
    preference_min_decisions: int = Field(20, ge=2)  # per side (accepted, rejected) before the predictor runs
    preference_min_probability: float = Field(0.2, ge=0, le=1)
    # into the snapshot
    max_share: float = Field(0.3, ge=0, le=1)  # of the snapshot's training rows
    max_per_intent: int = Field(60, ge=0)
    weight: float = Field(0.5, ge=0)  # loss weight factor below verified real samples (1.0)


class SelectionSettings(Section):
    strategy: Literal["random", "least_confidence", "margin", "entropy", "kcenter", "kmeans", "expected_change", "hybrid"] = "hybrid"
    labelling_budget: int = Field(500, ge=0)
    round_size: int = Field(100, ge=1)
    min_gain: float = Field(0.002, ge=0)  # stop when the last round gained less than this
    seed: int = 0
    hybrid_step: float = Field(0.25, ge=0, le=1)  # hybrid: the uncertainty share of picks grows by this per round
    # What the labelling budget counts: "champion" the labels given since the current champion took over
    # (each promoted model's failures get a fresh budget, so cycle after cycle can ask people again),
    # "project" every label ever given (a hard cap over the project's life).
    budget_scope: Literal["champion", "project"] = "champion"


class TrainSettings(Section):
    base_model: str = ""  # a local folder transformers can load
    # Where training jobs run: "local" (a child process) or "ray" (a Ray job on [ray] address, and the batch
    # stages as Ray tasks; docs/ray.md). Not part of a job's identity: the same spec trains the same adapter anywhere.
    launcher: Literal["local", "ray"] = "local"
    method: Literal["sft", "dpo", "kto"] = "sft"  # kto: unpaired good/bad answers (TRL KTOTrainer), from sft or dpo snapshots
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    # Modules trained in full and saved with the adapter (PEFT modules_to_save), e.g. ["lm_head"]; empty:
    # none. "auto": the input embedding and the output layer, when together they hold at most
    # full_train_max_params parameters (flywheel.trainer.sizing says why and where that line falls).
    modules_to_save: list[str] | Literal["auto"] = "auto"
    full_train_max_params: int = Field(20_000_000, ge=0)
    epochs: float = Field(2.0, gt=0)
    # A small snapshot trains for more epochs, until it makes at least min_steps optimizer steps, never
    # beyond max_epochs; early stopping on the held-out split ends it sooner. 0: epochs as set.
    min_steps: int = Field(300, ge=0)
    max_epochs: float = Field(12.0, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(256, ge=8)
    early_stopping_patience: int = Field(2, ge=0)  # evaluations without improvement before stopping; 0: off
    eval_steps: int = Field(0, ge=0)  # evaluate and checkpoint every N steps; 0: once per epoch
    dpo_beta: float = Field(0.1, gt=0)  # also KTO's beta: how far the adapter may move from the reference
    seed: int = 0
    # Training recipes (docs/learning.md, "Training recipes"; bench/recipes.py measures each on and off). All off
    # by default: none has been measured to help on both demo packs. They enter the job id: changing one trains anew.
    # Row order: "none" shuffles each epoch; "champion_loss" and "difficulty" go easy -> hard (trainer.curriculum).
    # "champion": a new adapter continues from the champion's (its LoRA shape and weights), so each cycle
    # builds on what the last promotion shipped instead of relearning it from the base; the first cycle,
    # whose champion is the base model, starts fresh either way. "base": always a fresh adapter.
    start_from: Literal["champion", "base"] = "champion"
    curriculum: Literal["none", "champion_loss", "difficulty"] = "none"
    focal_gamma: float = Field(0.0, ge=0, le=10)  # SFT: per-token (1 - p)^gamma on the answer tokens; 0: off
    # Against forgetting: a penalty pulling the trainable weights back to where the run started (trainer.anchor);
    # "ewc" weighs each weight by its Fisher information on the snapshot's replay rows.
    anchor: Literal["none", "l2", "ewc"] = "none"
    anchor_strength: float = Field(1.0, gt=0)  # lambda of lambda/2 * sum(w * (theta - theta0)^2)
    anchor_fisher_rows: int = Field(128, ge=1)  # ewc: replay rows the Fisher estimate reads at most
    # DPO loss (TRL's names; flywheel.trainer.weighted implements each with the per-row weights)
    dpo_loss_type: Literal["sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "sigmoid_norm"] = "sigmoid"
    dpo_label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # robust: the probability that a preference is flipped

    @model_validator(mode="after")
    def _recipe_options_fit(self) -> TrainSettings:
        if self.dpo_loss_type == "robust" and self.dpo_label_smoothing <= 0:
            raise ValueError("dpo_loss_type robust needs dpo_label_smoothing above 0 (the share of flipped preferences, e.g. 0.1)")
        return self


class RaySettings(Section):
    """A Ray cluster for training jobs and batch stages, used with train.launcher "ray" (docs/ray.md)."""

    address: str = ""  # the Job Submission API (the dashboard), e.g. "http://head:8265"
    # What batch stages connect to with ray.init: "host:6379" (GCS) or "ray://host:10001"; empty: address's host, port 6379
    cluster_address: str = ""
    # Ray's runtime_env for jobs and tasks: working_dir, pip, image_uri, env_vars, ... (flywheel adds its offline env_vars)
    runtime_env: dict[str, Any] = {}
    python: str = ""  # the interpreter the job runs the worker with; empty: the one running flywheel
    entrypoint_prefix: str = ""  # e.g. "accelerate launch --num_processes 4" (multi-GPU data parallel inside the job)
    num_cpus: float = Field(1.0, ge=0)  # per training job
    num_gpus: float = Field(0.0, ge=0)
    memory_mb: int = Field(0, ge=0)  # 0: no memory reservation
    # A shared path or fsspec URL (s3://, gs://, file://) both sides reach: the worker uploads the adapter
    # (safetensors only) and its checkpoints there; flywheel downloads and checks the sha256 before registering.
    storage: str = ""
    # A job Ray keeps pending this long (no node has the resources, the runtime_env never gets ready) is
    # stopped and marked failed with Ray's reason.
    pending_timeout_s: float = Field(600.0, gt=0)
    batch_stages: bool = True  # with launcher "ray": embedding, rule judging and eval generation run as Ray tasks over batches
    batch_rows: int = Field(256, ge=1)  # texts or failures per Ray task
    image: str = ""  # the container image `flywheel jobs manifest` puts in Kubernetes Jobs and RayJobs


class GateSettings(Section):
    targeted_min_relative_drop: float = Field(0.3, ge=0, le=1)  # targeted problem rates must fall by >= 30%
    targeted_min_count: int = Field(5, ge=1)  # rarer on the champion: only "must not get worse" is checked
    # The problem types a cycle must reduce; empty: every type in the cycle's problem set. The others
    # are held to max_regression like any other type.
    targeted: list[str] = []
    max_regression: float = Field(0.02, ge=0)  # absolute rise allowed for any other type or intent
    min_intent_samples: int = Field(5, ge=1)  # intents with fewer test rows are not gated on
    # How a drop beyond max_regression is judged (flywheel.evals.gate says why): "paired": it fails only
    # when McNemar's exact test on the items both models answered finds it significant at `alpha`, after
    # the `multiple_testing` correction over the intents (or problem types) of the set; "significant":
    # when its independent 95% interval excludes zero; "point": always.
    intent_rule: Literal["paired", "point", "significant"] = "paired"
    type_rule: Literal["paired", "point"] = "paired"  # the same for the non-targeted problem types
    alpha: float = Field(0.05, gt=0, lt=1)
    multiple_testing: Literal["holm", "bh", "none"] = "holm"  # holm: family-wise error; bh: false discovery rate
    block_new_severities: list[Severity] = ["high", "critical"]
    # Core baseline samples the candidate may break (pass with the champion, fail with the candidate).
    core_baseline_max_failures: int = Field(0, ge=0)


class EvalSettings(Section):
    # The fixed test set: JSONL rows {"messages": [...], "reference": {"intent": ..., "answer": ...}}.
    # Never trained on; dataset building refuses rows whose prompt appears in it.
    test_set: str = ""
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(16, ge=1)


class CanarySettings(Section):
    # A candidate that passed its gate serves a canary slice and is observed before a person is asked.
    before_approval: bool = True
    share: float = Field(0.1, gt=0, lt=1)
    # "sequential": a sequential likelihood-ratio test decides harm / no harm as soon as the evidence is
    # clear (flywheel.release.canary says which test and what it guarantees); "fixed": once both versions
    # served min_requests, any rate above the champion's by more than harm_margin rolls back.
    rule: Literal["sequential", "fixed"] = "sequential"
    min_requests: int = Field(50, ge=1)  # per version; no decision before (the floor of both rules)
    max_requests: int = Field(2000, ge=1)  # sequential: per version; undecided by then is "inconclusive" (kept)
    # fixed: the rise that rolls back; sequential: the harm alternative (a rise of at least this much)
    harm_margin: float = Field(0.05, ge=0, lt=1)
    alpha: float = Field(0.05, gt=0, lt=1)  # sequential: chance of rolling back a canary that does no harm
    beta: float = Field(0.1, gt=0, lt=1)  # sequential: chance of calling "no harm" on one that harms by harm_margin

    @model_validator(mode="after")
    def _window_fits(self) -> CanarySettings:
        if self.max_requests < self.min_requests:
            raise ValueError(f"max_requests {self.max_requests} is below min_requests {self.min_requests}")
        return self


class GraduationSettings(Section):
    """What a promotion does to the samples the promoted version still fails (flywheel.release.graduation)."""

    unresolved_weight_factor: float = Field(0.5, gt=0, le=1)  # their sample weight is multiplied by this
    min_weight: float = Field(0.1, ge=0)  # and never falls below this


class ApprovalSettings(Section):
    approvers: list[str] = []  # empty: any local user at the terminal; Slack needs an explicit list
    slack_approvers: list[str] = []  # Slack user ids


class AgentSettings(Section):
    policy: Literal["auto", "heuristic", "llm"] = "auto"  # auto: llm when an endpoint is configured
    max_steps: int = Field(40, ge=1)
    max_llm_calls: int = Field(60, ge=0)
    max_training_runs: int = Field(2, ge=0)
    prompt: str = "supervisor"


class LoopSettings(Section):
    """When back-to-back cycles stop (`flywheel run --until-stable`, flywheel.agent.cycles)."""

    max_cycles: int = Field(5, ge=1, le=1000)  # agent.cycles.MAX_CYCLES
    # stable: after a promotion, no targeted problem type fell by more than this on the fixed test set
    min_gain: float = Field(0.01, ge=0, le=1)
    max_labels: int = Field(0, ge=0)  # labels over all the cycles; 0: only selection.labelling_budget limits them
    max_training_runs: int = Field(0, ge=0)  # training jobs over all the cycles; 0: no limit beyond agent.max_training_runs per cycle
    max_wall_s: float = Field(0, ge=0)  # 0: no limit; checked between cycles, a running cycle is never cut
    max_gate_failures: int = Field(2, ge=1)  # cycles whose candidate failed its gate (or was rejected) before stopping


class Schedule(Section):
    id: str
    cron: str  # crontab expression, e.g. "0 3 * * *"; six fields: the first is the second (tests, fast loops)


class DaemonSettings(Section):
    schedules: list[Schedule] = []
    timezone: str = "UTC"  # the zone the cron expressions are read in
    misfire_grace_s: int = Field(900, ge=1)  # a firing missed while the daemon was down still runs (once) this late
    shutdown_grace_s: float = Field(30.0, ge=0)  # on SIGTERM, time given to a running cycle before leaving it resumable
    # Online rounds (flywheel.agent.rounds): a cycle starts once this many new verified samples have arrived
    # since the last round; 0: off. A million would never fire on any real stream: refused as a typo.
    round_min_verified: int = Field(0, ge=0, le=1_000_000)
    round_poll_s: float = Field(30.0, ge=0.1, le=3600)  # how often the daemon counts them (a store query each time)


class SlackSettings(Section):
    """Approvals in Slack; docs/slack.md has the app manifest and the steps."""

    mode: Literal["off", "socket", "http"] = "off"
    channel: str = ""
    api_url: str = ""  # empty: Slack's own; tests point it at a local server
    # tokens come from the environment only: SLACK_BOT_TOKEN, SLACK_APP_TOKEN, SLACK_SIGNING_SECRET
    http_host: str = "127.0.0.1"  # HTTP mode: where the app listens for Slack's requests (behind your TLS proxy)
    http_port: int = Field(3000, ge=0, le=65535)  # 0: any free port
    report_url: str = ""  # a URL serving <state>/artifacts; empty: the message shows the report's file path
    sync_interval_s: float = Field(15.0, gt=0)  # the daemon posts new approval requests and closes decided ones this often


class ServeSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    backend: Literal["builtin", "proxy"] = "builtin"
    upstream_url: str = ""
    max_body_bytes: int = Field(1_000_000, ge=1024)
    capture_queue: int = Field(10_000, ge=1)
    # --- the gateway (flywheel.serve) ---
    base_model: str = ""  # builtin backend: the base model folder; empty: train.base_model, then the champion's
    upstream_model: str = ""  # proxy: the upstream's name for the base model; empty: the version's base_model
    upstream_timeout_s: float = Field(120.0, gt=0)
    upstream_max_connections: int = Field(256, ge=1)
    # proxy: local adapter folder prefix -> the same folder as the upstream server sees it
    adapter_path_map: dict[str, str] = {}
    max_new_tokens: int = Field(256, ge=1)  # builtin: default and cap of max_tokens
    batch_size: int = Field(8, ge=1)  # builtin: concurrent requests generated as one batch
    routing_refresh_s: float = Field(0.25, gt=0, le=60)  # aliases re-read this often: promotions need no restart
    keys_refresh_s: float = Field(1.0, gt=0, le=300)  # API keys re-read this often: revocations need no restart
    capture: bool = True  # store every served interaction
    capture_batch: int = Field(256, ge=1)  # interactions per store transaction
    spill_dir: str = ""  # empty: <state_dir>/gateway; where capture spills while the store falls behind
    store_retry_s: float = Field(2.0, gt=0)  # after a store error, capture retries (and replays spills) this often
    shutdown_flush_s: float = Field(10.0, ge=0)  # on shutdown, time to write the queue to the store before spilling it


class ConsoleSettings(Section):
    """The web console (flywheel.console, docs/console.md)."""

    host: str = "127.0.0.1"  # loopback: put a TLS reverse proxy in front to reach it from elsewhere
    port: int = Field(8090, ge=1, le=65535)
    # A header a trusted reverse proxy sets to the logged-in user's name (e.g. "X-Forwarded-User"); empty:
    # off. Honoured only on requests from `trusted_proxies`, and only for names that are console users.
    trusted_header: str = ""
    trusted_proxies: list[str] = ["127.0.0.1", "::1"]  # client addresses the header is believed from
    secure_cookies: bool = False  # true behind HTTPS: the session cookie is sent over HTTPS only
    session_max_age_s: int = Field(12 * 3600, ge=60)
    page_size: int = Field(50, ge=5, le=500)  # rows per page of the failures list

"""The typed records of synthesis: what generators read (`Seed`, `SynthesisInputs`), what they write
(`Generated`, `GeneratorProblem`), and what the scorer makes of it (`Scored`).

A generated sample's id is a hash of everything that made it (generator, parameters, source, prompt,
answer, kind), so the same inputs, seed and settings give the same ids and a resumed run adds nothing
twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from flywheel.records import Interaction, Message, Record, stable_hash

if TYPE_CHECKING:
    import numpy as np

    from flywheel.settings import Settings

# reply: a user turn and the answer to it. The staged tool-call kinds split one tool-calling turn in
# three rows: choose the tool, fill its arguments, turn its result into the reply.
SampleKind = Literal["reply", "tool_choice", "tool_arguments", "tool_reply"]
SAMPLE_KINDS: tuple[str, ...] = ("reply", "tool_choice", "tool_arguments", "tool_reply")


class Seed(Record):
    """A verified sample a generator may start from: a labelled or corrected failure (its verified
    answer), or a logged answer a person confirmed."""

    id: str  # the failure id
    intent: str
    problem_type: str
    messages: list[Message]  # the prompt, up to the answer
    answer: str
    origin: str  # label | label_fine | correction | kb_correction | baseline ...

    def last_user(self) -> str:
        return next((m.content or "" for m in reversed(self.messages) if m.role == "user"), "")


class Generated(Record):
    """One candidate sample as a generator wrote it, with its provenance."""

    generator: str
    params: dict[str, Any] = {}  # what the generator did (the template, the rewrite, the style ...)
    source_id: str | None = None  # the seed, interaction or KB entry it came from
    source_text: str | None = None  # that source's user text, for the similarity checks
    intent: str
    problem_type: str
    kind: SampleKind = "reply"
    messages: list[Message]  # the prompt
    answer: str
    # the failing answer this sample corrects, when there is one (mining: what production logged): the
    # snapshot's replay mix protects the intent it corrects away from, and DPO gets a pair
    rejected: str | None = None

    @property
    def id(self) -> str:
        return "syn-" + stable_hash(
            {
                "generator": self.generator,
                "params": self.params,
                "source": self.source_id,
                "kind": self.kind,
                "messages": [m.model_dump(exclude_none=True) for m in self.messages],
                "answer": self.answer,
            },
            20,
        )

    def last_user(self) -> str:
        return next((m.content or "" for m in reversed(self.messages) if m.role == "user"), "")


class GeneratorProblem(Record):
    """Bad input a generator met (a malformed template, a KB triple missing a part, an LLM reply that
    fails the schema): reported with its source and skipped; nothing else is lost."""

    generator: str
    source: str  # file:line, KB entry id, seed id, ...
    problem: str


class Scored(Record):
    """A generated sample with every score the scorer computed and whether it is kept."""

    id: str
    sample: Generated
    scores: dict[str, float | str | None] = {}
    kept: bool
    reasons: list[str] = []  # why it was dropped (the first is the filter that dropped it); empty when kept


@dataclass
class GeneratorOutput:
    samples: list[Generated] = field(default_factory=list)
    problems: list[GeneratorProblem] = field(default_factory=list)


@dataclass
class SynthesisInputs:
    """Everything a generator may read, gathered once by the stage. Generators are pure functions of
    this (and their own seeded random numbers): no store, no network except through `chat_model`."""

    settings: Settings
    seeds: Sequence[Seed]  # verified samples
    # captured interactions that no person labelled (mining), and every stable tool-calling interaction
    # (staged tool-call samples)
    unlabelled: Sequence[Interaction] = ()
    tool_interactions: Sequence[Interaction] = ()
    # stable production answers (no negative signal, clean by the rule judge): what already works
    stable: Sequence[Interaction] = ()
    # KB entries: {"id", "text", "kind", "intent", "title", "head", "relation", "tail", "source"}
    kb: Sequence[dict[str, Any]] = ()
    # texts -> unit vectors (store.vectors.Embedder.embed); None where the caller has no index
    embed: Callable[[Sequence[str]], np.ndarray] | None = None
    # a langchain chat model (ChatOpenAI) when llm.base_url is set; None offline
    chat_model: Any = None
    # intent -> how many more samples it wants (the stage's targets: intents short of verified samples)
    wants: dict[str, int] = field(default_factory=dict)
    seed: int = 0  # the random seed; each generator derives its own stream from it


Generator = Callable[[SynthesisInputs], GeneratorOutput]

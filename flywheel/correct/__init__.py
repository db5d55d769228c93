"""The correction stage: a better answer for every judged failure, verified before anything may train on it.

Imports run one way:

* `cases`: the records every piece shares (Case, Attempt, outcomes), loading the failures to correct,
  saving attempts and indexing verified corrections;
* `kb` (the knowledge-base corrector), `llm` (the LLM corrector) and `verify` (the verifier) read them;
* `stage` runs the stage (`correct_failures`, `reindex_verified`).
"""

"""Release: model versions and aliases, human decisions, canaries, sample graduation.

  records     the release records: ModelVersion, AliasSwitch, Approval, Decision (one definition each)
  registry    versions v1, v2, ..., the champion/canary/previous aliases, effect keys
  approvals   who may approve; approve, promote, reject, rollback
  decisions   what a person is asked (PendingApproval) and how their answer is applied
  canary      a candidate serving a share of users, rolled back automatically when it harms
  graduation  what a promotion (or a rollback) means for the samples it was trained on
  evaluation  a version as a model to evaluate, and its eval report read back against its hash

The SQL is behind the repositories in flywheel.store (versions, approvals, canary_events, tiers); no
module here builds a query. Importing this package imports none of its modules.
"""

"""The preference predictor: how likely a person is to accept an answer to a user turn, learned from
what people already decided.

Decisions come from the labels: a person who marked a logged answer "fine" accepted that answer; a
person who gave another intent or answer rejected the logged one and accepted the verified correction
written from their label. Each (user turn, answer) pair is embedded and the features [u, a, u*a]
(the product carries how well the answer fits the turn, which neither vector says alone) train a
scikit-learn logistic regression. It is trained only once `preference_min_decisions` decisions of each
side exist; before that there is no predictor and the check is skipped, not guessed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from flywheel.records import FailureStatus
from flywheel.settings import Settings
from flywheel.store.db import Store

Embed = Callable[[Sequence[str]], np.ndarray]


def decisions(store: Store) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(accepted, rejected) (user turn, answer) pairs from people's labels."""
    from flywheel.data.labels import latest_labels
    from flywheel.store import failures as failure_repo
    from flywheel.store import interactions as interaction_repo
    from flywheel.store import labels as label_repo

    accepted: list[tuple[str, str]] = []
    rejected: list[tuple[str, str]] = []
    with store.engine.connect() as conn:
        labelled = label_repo.labelled_failures(conn)
        ids = [fid for fid, _ in labelled]
        labels = latest_labels(conn, ids)
        found = {f.id: f for f in failure_repo.get_failures(conn, ids=ids)}
        interactions = interaction_repo.get_many(conn, [f.interaction_id for f in found.values()])
        corrections = failure_repo.newest_corrections(conn, ids, verified_only=True)
    for fid, status in labelled:
        failure, label = found.get(fid), labels.get(fid)
        if failure is None or label is None or failure.interaction_id not in interactions:
            continue
        interaction = interactions[failure.interaction_id]
        user, logged = interaction.last_user_text(), interaction.last_assistant()
        if not user.strip() or logged is None or not (logged.content or "").strip():
            continue
        if label.fine or status == str(FailureStatus.NOT_FAILURE):
            accepted.append((user, logged.content or ""))
            continue
        rejected.append((user, logged.content or ""))
        correction = corrections.get(fid)
        if correction is not None and correction.answer.strip() and correction.answer != logged.content:
            accepted.append((user, correction.answer))
    return accepted, rejected


def features(embed: Embed, users: Sequence[str], answers: Sequence[str]) -> np.ndarray:
    u, a = embed(list(users)), embed(list(answers))
    return np.hstack([u, a, u * a])


def train_preference(
    store: Store, settings: Settings, embed: Embed
) -> tuple[Callable[[Sequence[str], Sequence[str]], np.ndarray] | None, dict[str, int]]:
    """The predictor (None until enough decisions exist) and how many decisions it saw."""
    accepted, rejected = decisions(store)
    info = {"accepted": len(accepted), "rejected": len(rejected)}
    need = settings.synthesis.preference_min_decisions
    if len(accepted) < need or len(rejected) < need:
        return None, info
    from sklearn.linear_model import LogisticRegression

    pairs = accepted + rejected
    x = features(embed, [u for u, _ in pairs], [a for _, a in pairs])
    y = np.array([1] * len(accepted) + [0] * len(rejected))
    # balanced: labels are mostly corrections of failures, so rejections outnumber acceptances
    model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000, random_state=settings.synthesis.seed).fit(x, y)

    def predict(users: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        if not users:
            return np.zeros(0)
        return np.asarray(model.predict_proba(features(embed, users, answers))[:, 1])

    return predict, info

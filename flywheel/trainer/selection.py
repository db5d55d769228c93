"""Active learning: which unlabelled candidates to send to people, under a labelling budget.

Strategies, by the name a user gives (`flywheel select --strategy NAME`):

- `random`            the baseline every other strategy has to beat.
- `least_confidence`  lowest probability of the production model's own top token (1 - top1).
- `margin`            smallest gap between the top two token probabilities (top1 - top2).
- `entropy`           highest entropy of the next-token distribution.
- `kcenter`           k-center greedy over embeddings: each pick is the point farthest from everything
                      picked or labelled so far, so far-apart regions are each covered once.
- `kmeans`            mini-batch k-means (scikit-learn's MiniBatchKMeans) with k = picks; the point
                      nearest each centroid is picked.
- `expected_change`   a cheap stand-in for "how much would this label move the model": the norm of the
                      BADGE last-layer gradient embedding, ||p - e_top1|| x ||h||, approximated from what a
                      candidate carries as sqrt((1 - top1)^2 + top2^2) x ||h|| (just (1 - top1) x ||h|| without
                      top2). h is `hidden_norm` (the production model's last hidden state norm) when given,
                      else the embedding norm. The top-k by that magnitude are picked (BADGE's k-means++ over
                      full gradient embeddings is not attempted: it needs the model's gradients).
- `hybrid`            diversity first, uncertainty later: in round r a share min(1, r x hybrid_step) of the
                      picks is the most uncertain candidates, the rest k-center picks around them and the
                      already labelled. Early rounds explore the space; once the model has seen it, the
                      budget goes where the model is unsure.

Uncertainty features are per candidate, averaged over its first generated tokens: `top1`, `top2`
(probabilities), `entropy` (nats), or `mean_logprob` (of the generated tokens) when only that is logged.

Cost at n = 100,000 candidates, d = 384 (bench/selection.py): k-center greedy does k matrix-vector
products (O(n k d), memory bound: k = 500 took 7.6 s on an idle 2-core machine, 22 s at load 10).
Above `PROJECT_ABOVE` multiply-adds (e.g. k >= 1,100 at that n and d) the embeddings are first projected
to `PROJECT_DIMS` dimensions with a seeded Gaussian random projection (scikit-learn's
GaussianRandomProjection): squared distances keep their
order roughly (typical relative error ~ sqrt(2 / 128) = 12%, Johnson-Lindenstrauss) at a third of the cost,
and k-center greedy is only a 2-approximation to begin with.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import Field

from flywheel.errors import UserInputError
from flywheel.records import Record

Strategy = Literal["random", "least_confidence", "margin", "entropy", "kcenter", "kmeans", "expected_change", "hybrid"]
STRATEGIES: tuple[str, ...] = ("random", "least_confidence", "margin", "entropy", "kcenter", "kmeans", "expected_change", "hybrid")
FEATURES: tuple[str, ...] = ("top1", "top2", "entropy", "mean_logprob", "hidden_norm")

PROJECT_ABOVE = 4e10  # n * k * d multiply-adds above which k-center runs on a random projection
PROJECT_DIMS = 128
_CHUNK = 8192  # rows per block in blocked distance computations: (8192 x k) float32 stays in cache-friendly sizes


@dataclass
class Candidates:
    """Unlabelled candidates as arrays: ids (n), embeddings (n, d) and optional uncertainty features (n,)."""

    ids: list[str]
    embeddings: np.ndarray
    top1: np.ndarray | None = None
    top2: np.ndarray | None = None
    entropy: np.ndarray | None = None
    mean_logprob: np.ndarray | None = None
    hidden_norm: np.ndarray | None = None
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False)  # built in __post_init__

    def __post_init__(self) -> None:
        self.ids = [str(i) for i in self.ids]
        n = len(self.ids)
        emb = np.asarray(self.embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != n:
            raise UserInputError(f"candidates: embeddings must have shape ({n}, d), got {emb.shape}")
        if not np.isfinite(emb).all():
            raise UserInputError("candidates: embeddings hold NaN or infinite values")
        self.embeddings = np.ascontiguousarray(emb)
        for name in FEATURES:
            value = getattr(self, name)
            if value is None:
                continue
            arr = np.asarray(value, dtype=np.float64).reshape(-1)
            if arr.shape[0] != n:
                raise UserInputError(f"candidates: {name} has {arr.shape[0]} values for {n} candidates")
            if not np.isfinite(arr).all():
                raise UserInputError(f"candidates: {name} holds NaN or infinite values")
            if name in ("top1", "top2") and ((arr < 0) | (arr > 1)).any():
                raise UserInputError(f"candidates: {name} must be probabilities in [0, 1]")
            setattr(self, name, arr)
        self._index = {cid: i for i, cid in enumerate(self.ids)}
        if len(self._index) != n:
            raise UserInputError("candidates: ids are not unique")

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, ids: Sequence[str] | None) -> np.ndarray:
        """Row positions of the given ids; ids that are not candidates are ignored."""
        if not ids:
            return np.zeros(0, dtype=np.int64)
        return np.array([self._index[i] for i in ids if i in self._index], dtype=np.int64)

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, Any]], where: str = "candidates") -> Candidates:
        """From dicts {"id", "embedding": [...], optional "top1", "top2", "entropy", "mean_logprob",
        "hidden_norm"}. A feature is used only when every row has it."""
        if not rows:
            raise UserInputError(f"{where}: no candidates")
        for number, row in enumerate(rows, start=1):
            if "id" not in row or "embedding" not in row:
                raise UserInputError(f"{where}: row {number} needs an 'id' and an 'embedding'")
        features = {
            name: np.array([row[name] for row in rows], dtype=np.float64)
            for name in FEATURES
            if all(row.get(name) is not None for row in rows)
        }
        try:
            embeddings = np.array([row["embedding"] for row in rows], dtype=np.float32)
        except ValueError:
            raise UserInputError(f"{where}: embeddings have different lengths") from None
        return cls(ids=[str(row["id"]) for row in rows], embeddings=embeddings, **features)


# --- scores -----------------------------------------------------------------------------------------------


def _top1(c: Candidates, strategy: str) -> np.ndarray:
    if c.top1 is not None:
        return c.top1
    if c.mean_logprob is not None:  # the probability of the generated tokens stands in for top1
        return np.exp(np.minimum(c.mean_logprob, 0.0))
    raise UserInputError(f"strategy {strategy} needs the production model's token probabilities: give top1 or mean_logprob per candidate")


def uncertainty(c: Candidates, strategy: str = "hybrid") -> np.ndarray:
    """Higher = less sure. Entropy when known, else 1 - top1."""
    if c.entropy is not None:
        return c.entropy
    return 1.0 - _top1(c, strategy)


def scores(c: Candidates, strategy: str) -> np.ndarray:
    """The score each uncertainty strategy ranks by, higher first."""
    if strategy == "least_confidence":
        return 1.0 - _top1(c, strategy)
    if strategy == "margin":
        if c.top2 is None:
            raise UserInputError("strategy margin needs top1 and top2 per candidate")
        return -(_top1(c, strategy) - c.top2)
    if strategy == "entropy":
        if c.entropy is not None:
            return c.entropy
        if c.top1 is None:
            raise UserInputError("strategy entropy needs entropy (or top1) per candidate")
        # A lower bound from what is known: the top two and the rest lumped together as one outcome.
        parts = [c.top1] + ([c.top2] if c.top2 is not None else [])
        rest = np.clip(1.0 - sum(parts), 0.0, 1.0)
        return -sum(p * np.log(np.clip(p, 1e-12, 1.0)) for p in [*parts, rest])
    if strategy == "expected_change":
        p1 = _top1(c, strategy)
        wrong = np.sqrt((1.0 - p1) ** 2 + c.top2**2) if c.top2 is not None else 1.0 - p1
        norm = c.hidden_norm if c.hidden_norm is not None else np.linalg.norm(c.embeddings, axis=1).astype(np.float64)
        return wrong * norm
    raise UserInputError(f"strategy {strategy!r} has no score")


def _top_k(score: np.ndarray, allowed: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k highest scores among allowed ones; ties go to the earlier candidate."""
    pos = np.flatnonzero(allowed)
    if k >= len(pos):
        k = len(pos)
    order = np.lexsort((pos, -score[pos]))  # primary: score descending, then position
    return pos[order[:k]]


# --- diversity --------------------------------------------------------------------------------------------


def _project(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    n, d = x.shape
    if n * k * d <= PROJECT_ABOVE or d <= PROJECT_DIMS:
        return x
    from sklearn.random_projection import GaussianRandomProjection

    # entries N(0, 1 / PROJECT_DIMS), float32 like the input
    projection = GaussianRandomProjection(n_components=PROJECT_DIMS, random_state=seed)
    return np.ascontiguousarray(projection.fit_transform(x), dtype=np.float32)


def kcenter_greedy(x: np.ndarray, k: int, allowed: np.ndarray, centers: np.ndarray, seed: int = 0) -> np.ndarray:
    """k-center greedy: repeatedly take the allowed point farthest from its nearest center.

    `centers` are positions already covered (labelled or picked this round). Squared distances are kept
    per point and updated with one matrix-vector product per pick: ||x||^2 - 2 x.c + ||c||^2.
    """
    x = _project(x, k, seed)
    sq = np.einsum("ij,ij->i", x, x)
    nearest = np.full(len(x), np.inf, dtype=np.float32)
    for start in range(0, len(centers), 256):  # existing centers in blocks: one GEMM per block
        block = x[centers[start : start + 256]]
        for row in range(0, len(x), _CHUNK):
            part = x[row : row + _CHUNK]
            d = sq[row : row + _CHUNK, None] - 2.0 * (part @ block.T) + sq[centers[start : start + 256]][None, :]
            np.minimum(nearest[row : row + _CHUNK], d.min(axis=1), out=nearest[row : row + _CHUNK])
    nearest[~allowed] = -np.inf  # never picked; still counts as covered space through `centers`
    picks: list[int] = []
    with _one_thread("blas"):  # one memory-bound product per pick: see _one_thread
        if len(centers) == 0:
            pos = np.flatnonzero(allowed)
            if len(pos) == 0 or k == 0:
                return np.zeros(0, dtype=np.int64)
            first = int(np.random.default_rng(seed).choice(pos))
            picks.append(first)
            _cover(x, sq, first, nearest)
        while len(picks) < k:
            best = int(np.argmax(nearest))
            if nearest[best] == -np.inf:
                break  # nothing allowed is left
            picks.append(best)
            _cover(x, sq, best, nearest)
    return np.array(picks, dtype=np.int64)


def _cover(x: np.ndarray, sq: np.ndarray, center: int, nearest: np.ndarray) -> None:
    d = x @ x[center]
    d *= -2.0
    d += sq
    d += sq[center]
    d[center] = -np.inf  # the center itself: covered, never picked again
    np.minimum(nearest, d, out=nearest)


def kmeans_picks(x: np.ndarray, k: int, allowed: np.ndarray, seed: int = 0, iterations: int = 20, batch: int = 4096) -> np.ndarray:
    """Mini-batch k-means (Sculley 2010; scikit-learn's MiniBatchKMeans) with k = picks over the allowed
    points, about `iterations` mini-batches of `batch` points, k-means++ seeded on a sample; then per
    cluster the member nearest its centroid. Empty clusters give their pick to the allowed points
    farthest from their centroid (the ones no cluster describes well)."""
    from sklearn.cluster import MiniBatchKMeans, kmeans_plusplus
    from sklearn.metrics import pairwise_distances_argmin_min

    pos = np.flatnonzero(allowed)
    k = min(k, len(pos))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    pts = x[pos]
    batch = min(batch, len(pts))
    # k-means++ seeding on a sample of 3 batches (as MiniBatchKMeans does): seeding is sequential in k, so
    # its cost is what the sample size buys. Seeded here rather than by MiniBatchKMeans because its own
    # seeding tries 2 + log(k) candidates per centre and upcasts float32 block by block: 28 s instead of
    # 0.9 s at k = 500 (bench/selection.py data). In float64 with one candidate per centre it is plain
    # k-means++ (D^2 sampling), the seeding this strategy always had.
    sample = pts[rng.choice(len(pts), size=min(len(pts), max(3 * k, 3 * batch)), replace=False)]
    with _one_thread():  # BLAS and OpenMP: see _one_thread (on 2 cores at load 4-6: 6-8 s -> 4-5 s)
        centroids, _ = kmeans_plusplus(sample.astype(np.float64), k, random_state=seed, n_local_trials=1)
        model = MiniBatchKMeans(
            n_clusters=k,
            init=centroids.astype(np.float32),
            n_init=1,
            batch_size=batch,
            max_iter=max(1, math.ceil(iterations * batch / len(pts))),  # scikit-learn counts passes over the data, not batches
            compute_labels=False,  # the labels come from the final centroids below
            # no reassignment of small clusters' centres to random points: on skewed data it moved the centres of
            # rare clusters into common ones (clusters covered 143 -> 130 of 200 on a long-tailed sample)
            reassignment_ratio=0.0,
            max_no_improvement=None,  # about `iterations` batches, no early stop on a noisy batch inertia
            random_state=seed,
        ).fit(pts)
        labels, dist = pairwise_distances_argmin_min(pts, model.cluster_centers_)
    order = np.lexsort((dist, labels))  # by cluster, nearest first
    first = np.ones(len(order), dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    picks = order[first]
    if len(picks) < k:  # empty clusters
        rest = np.setdiff1d(np.arange(len(pts)), picks)
        extra = rest[np.argsort(-dist[rest], kind="stable")[: k - len(picks)]]
        picks = np.concatenate([picks, extra])
    return pos[picks]


def _one_thread(user_api: str | None = None) -> Any:
    """Sequential loops of matrix-vector products and of small mini-batch steps run faster on one
    thread on a busy machine (measured at load 10-12 on 2 cores: k-means++ seeding 9.2 s -> 2.9 s, 200
    k-center picks over 100,000 x 384 12.5 s -> 9.4 s): thread hand-offs cost more than a memory-bound
    product gains. `user_api` "blas" or "openmp" limits only that pool; None limits both.
    threadpoolctl comes with scikit-learn; without it this is a no-op."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api=user_api)


# --- the entry point --------------------------------------------------------------------------------------


def hybrid_uncertainty_share(round_index: int, step: float) -> float:
    return min(1.0, max(0, round_index) * step)


def select(
    candidates: Candidates,
    strategy: str,
    k: int,
    *,
    round_index: int = 0,
    already_selected: Sequence[str] | None = None,
    seed: int = 0,
    hybrid_step: float = 0.25,
) -> list[str]:
    """The ids of up to k candidates to label next, best first. `already_selected` ids are never picked
    again; the diversity strategies treat them as covered."""
    if strategy not in STRATEGIES:
        raise UserInputError(f"unknown selection strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if k < 0:
        raise UserInputError(f"the number of picks must be >= 0, got {k}")
    taken = candidates.positions(already_selected)
    allowed = np.ones(len(candidates), dtype=bool)
    allowed[taken] = False
    k = min(k, int(allowed.sum()))
    if k == 0:
        return []
    if strategy == "random":
        picks = np.random.default_rng(seed).choice(np.flatnonzero(allowed), size=k, replace=False)
    elif strategy == "kcenter":
        picks = kcenter_greedy(candidates.embeddings, k, allowed, taken, seed)
    elif strategy == "kmeans":
        picks = kmeans_picks(candidates.embeddings, k, allowed, seed)
    elif strategy == "hybrid":
        n_unsure = round(k * hybrid_uncertainty_share(round_index, hybrid_step))
        unsure = _top_k(uncertainty(candidates), allowed, n_unsure) if n_unsure else np.zeros(0, dtype=np.int64)
        allowed[unsure] = False
        diverse = kcenter_greedy(candidates.embeddings, k - len(unsure), allowed, np.concatenate([taken, unsure]), seed)
        picks = np.concatenate([unsure, diverse])
    else:
        picks = _top_k(scores(candidates, strategy), allowed, k)
    return [candidates.ids[int(i)] for i in picks]


# --- rounds under a budget --------------------------------------------------------------------------------


class SelectionRound(Record):
    index: int
    ids: list[str]
    gain: float
    uncertainty_share: float | None = None  # hybrid only: the share of uncertainty picks this round


class SelectionLog(Record):
    strategy: str
    budget: int
    round_size: int
    min_gain: float
    rounds: list[SelectionRound] = []
    selected: list[str] = []
    spent: int = 0
    stop_reason: Literal["budget", "min_gain", "exhausted", ""] = ""
    seed: int = 0
    extra: dict[str, Any] = Field(default_factory=dict)


def run_rounds(
    candidates: Candidates,
    strategy: str,
    budget: int,
    round_size: int,
    label_fn: Callable[[list[str]], Any],
    gain_fn: Callable[[list[str], list[str]], float],
    min_gain: float,
    *,
    seed: int = 0,
    already_selected: Sequence[str] | None = None,
    hybrid_step: float = 0.25,
    refresh: Callable[[list[str]], Candidates] | None = None,
) -> SelectionLog:
    """Pick, label and measure in rounds until the budget is spent, the candidates run out, or a
    round gains less than `min_gain`.

    `label_fn(round_ids)` gets each round's picks labelled (by people, or a judge). `gain_fn(round_ids,
    selected_so_far)` says what that round bought, e.g. the rise of a validation metric after training on
    the labels so far. `refresh(selected_so_far)`, when given, returns new candidates for the next round
    (the model retrained, so its token probabilities changed).
    """
    if budget < 0 or round_size < 1:
        raise UserInputError(f"budget must be >= 0 and round_size >= 1 (got {budget}, {round_size})")
    log = SelectionLog(strategy=strategy, budget=budget, round_size=round_size, min_gain=min_gain, seed=seed)
    prior = list(already_selected or [])
    index = 0
    while True:
        if log.spent >= budget:
            log.stop_reason = "budget"
            break
        want = min(round_size, budget - log.spent)
        ids = select(
            candidates, strategy, want, round_index=index, already_selected=prior + log.selected, seed=seed + index, hybrid_step=hybrid_step
        )
        if not ids:
            log.stop_reason = "exhausted"
            break
        label_fn(ids)
        log.selected.extend(ids)
        log.spent += len(ids)
        gain = float(gain_fn(ids, list(log.selected)))
        share = hybrid_uncertainty_share(index, hybrid_step) if strategy == "hybrid" else None
        log.rounds.append(SelectionRound(index=index, ids=ids, gain=gain, uncertainty_share=share))
        index += 1
        if gain < min_gain:
            log.stop_reason = "min_gain"
            break
        if refresh is not None and log.spent < budget:
            candidates = refresh(list(log.selected))
    return log

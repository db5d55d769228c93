"""Time every selection strategy over 100,000 random candidates (384-d embeddings), budget 500.

    python bench/selection.py [--n 100000] [--k 500] [--round-size 100]

Prints one JSON object: {"n": ..., "k": ..., "seconds": {strategy: seconds}}. The hybrid is timed as
budget / round_size rounds of round_size picks (round index 0, 1, ...), as `run_rounds` drives it; the
others as one call for all k picks.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from flywheel.trainer.selection import STRATEGIES, Candidates, select


def make_candidates(n: int, d: int, seed: int = 0) -> Candidates:
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, d), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)  # sentence embeddings are unit length
    top1 = rng.uniform(0.2, 1.0, n)
    top2 = rng.uniform(0.0, 1.0, n) * (1.0 - top1)
    probs = np.stack([top1, top2, 1.0 - top1 - top2], axis=1)
    entropy = -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1)
    return Candidates(ids=[f"c{i}" for i in range(n)], embeddings=emb, top1=top1, top2=top2, entropy=entropy, mean_logprob=np.log(top1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--k", type=int, default=500)
    parser.add_argument("--round-size", type=int, default=100)
    args = parser.parse_args()
    candidates = make_candidates(args.n, args.d)
    seconds: dict[str, float] = {}
    for strategy in STRATEGIES:
        start = time.perf_counter()
        if strategy == "hybrid":
            picked: list[str] = []
            for index in range(0, (args.k + args.round_size - 1) // args.round_size):
                want = min(args.round_size, args.k - len(picked))
                picked += select(candidates, strategy, want, round_index=index, already_selected=picked, seed=index)
        else:
            picked = select(candidates, strategy, args.k, seed=0)
        seconds[strategy] = round(time.perf_counter() - start, 3)
        assert len(set(picked)) == min(args.k, args.n), (strategy, len(set(picked)))
    print(json.dumps({"n": args.n, "d": args.d, "k": args.k, "round_size": args.round_size, "seconds": seconds}))


if __name__ == "__main__":
    main()

"""A second demo pack derived from another one: a random subset of its intents, nothing else made up.

The derived pack keeps, for `intents` categories drawn at random (with `seed`) from the source pack,
every train.csv row and every test.csv row of those categories, each in its own split (test rows stay
test rows). It has no kb.jsonl and no demo.toml, so the demo runs it on its defaults: generic approved
replies written from the intent names, no policy-breaking promise, the default simulated users. The
source's LICENSE is copied along (the rows are the source's rows).

    python bench/packs.py --out bench/out/packs/banking77-40-s11 --intents 40 --seed 11

Prints one JSON object: {"folder": ..., "source": ..., "intents": N, "train_rows": N, "test_rows": N}.
The same arguments write the same files, byte for byte.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import shutil
from pathlib import Path

from flywheel.demo.pack import default_pack_dir, load_pack


def derive_pack(source: Path | None, out: Path, *, intents: int, seed: int) -> Path:
    """Write the derived pack into `out` (created; an existing pack there is overwritten) and return it."""
    pack = load_pack(source)
    if not 1 <= intents <= len(pack.intents):
        raise SystemExit(f"--intents {intents}: the source pack {pack.folder} has {len(pack.intents)} intents")
    picked = set(random.Random(seed).sample(sorted(pack.intents), intents))
    chosen = [name for name in pack.intents if name in picked]  # in the source's order
    out.mkdir(parents=True, exist_ok=True)
    for name in ("kb.jsonl", "demo.toml"):  # a folder reused from something else must not keep these
        (out / name).unlink(missing_ok=True)
    _write_if_changed(out / "categories.json", json.dumps(chosen, indent=2) + "\n")
    counts = {}
    for split, rows in (("train", pack.train), ("test", pack.test)):
        kept = [row for row in rows if row.intent in picked]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["text", "category"])
        writer.writerows([row.text, row.intent] for row in kept)
        _write_if_changed(out / f"{split}.csv", buffer.getvalue())
        counts[split] = len(kept)
    licence = pack.folder / "LICENSE"
    if licence.is_file() and (not (out / "LICENSE").is_file() or (out / "LICENSE").read_bytes() != licence.read_bytes()):
        shutil.copyfile(licence, out / "LICENSE")
    _write_if_changed(
        out / "README.md",
        (
            f"# Derived pack\n\nDerived by bench/packs.py from the pack `{pack.name}`: {intents} of its {len(pack.intents)} intents, "
            f"drawn with seed {seed}; {counts['train']} train rows and {counts['test']} test rows, each from the same split of "
            "the source. No kb.jsonl, no demo.toml: the demo's defaults apply. The rows are the source's (see LICENSE).\n"
        ),
    )
    return out


def describe(folder: Path) -> dict[str, object]:
    pack = load_pack(folder)
    return {"folder": str(folder.resolve()), "intents": len(pack.intents), "train_rows": len(pack.train), "test_rows": len(pack.test)}


def _write_if_changed(path: Path, text: str) -> None:
    data = text.encode("utf-8")
    if not path.is_file() or path.read_bytes() != data:
        path.write_bytes(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=None, help=f"the source pack (default: {default_pack_dir()})")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--intents", type=int, default=40)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    folder = derive_pack(args.source, args.out, intents=args.intents, seed=args.seed)
    print(json.dumps({**describe(folder), "source": str(load_pack(args.source).folder)}))


if __name__ == "__main__":
    main()

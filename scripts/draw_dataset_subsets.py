#!/usr/bin/env python3
"""Draws the seeded subsets of the Alpaca harmless splits in data/datasets/.

    python3 scripts/draw_dataset_subsets.py SPLITS_DIR [OUT_DIR]

SPLITS_DIR holds `harmless_train.json` and `harmless_val.json` from andyrdt/refusal_direction
(`dataset/splits/`, commit 9d852fae1a9121c78b29142de733cb1340770cc3; data/datasets/SOURCES.md
says where they come from). OUT_DIR defaults to data/datasets next to this script. The inputs
are checked against their upstream git blob ids first, so a redraw from the same files writes
byte-identical subsets.

Each subset is `random.Random(seed).sample(range(len(rows)), size)`, sorted, so the rows keep
their upstream order; the rows themselves are not changed. The output is written as upstream
writes it (`json.dump(rows, f, indent=4)`, ASCII with \\u escapes, no trailing newline).
"""

import hashlib
import json
import random
import sys
from pathlib import Path

# name -> (rows to keep, seed, git blob id of the full upstream file)
SUBSETS = {
    "harmless_train.json": (2000, 0, "700a497bd1d20ab074fcc576e9bd79ac604543c5"),
    "harmless_val.json": (1000, 1, "6b9ee6e9c789799354b618a046758276da445bd8"),
}


def git_blob_id(data: bytes) -> str:
    """What `git hash-object` prints for a file holding `data`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def draw(source: Path, size: int, seed: int, blob: str) -> list:
    data = source.read_bytes()
    found = git_blob_id(data)
    if found != blob:
        sys.exit(f"{source}: git blob {found}, expected upstream's {blob}")
    rows = json.loads(data)
    keep = sorted(random.Random(seed).sample(range(len(rows)), size))
    return [rows[i] for i in keep]


def main() -> None:
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    splits = Path(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) == 3 else Path(__file__).parent.parent / "data" / "datasets"
    for name, (size, seed, blob) in SUBSETS.items():
        rows = draw(splits / name, size, seed, blob)
        text = json.dumps(rows, indent=4)
        (out / name).write_text(text, encoding="utf-8")
        print(f"{out / name}: {len(rows)} rows (seed {seed}), git blob {git_blob_id(text.encode())}")


if __name__ == "__main__":
    main()

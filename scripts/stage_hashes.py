"""Print the code hash of every stage (what its cache keys take from the code) and one digest of them all.

Two checkouts that print the same digest reuse each other's finished shards on one store; a long matrix can be
continued from a later commit when its digest equals the one the matrix started with (docs/benchmarks.md).
``python scripts/stage_hashes.py [--all]``
"""

from __future__ import annotations

import hashlib
import json
import sys

from ddpipe.methods import METHODS
from ddpipe.stages import DATASET, EVALUATION, LABELS, RANDOM_SUBSET, TEACHER


def stage_hashes() -> dict[str, str]:
    stages = (DATASET, TEACHER, RANDOM_SUBSET, LABELS, EVALUATION, *(s for m in METHODS.values() for s in m.stages()))
    return {f"{s.name}:{s.run.__name__}": s.code() for s in stages}


if __name__ == "__main__":
    hashes = stage_hashes()
    if "--all" in sys.argv:
        for name, h in sorted(hashes.items()):
            print(f"{h}  {name}")
    print(hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:12])

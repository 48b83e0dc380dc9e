"""Print the code hash of every stage (what its cache keys take from the code) and one digest of them all.

Two checkouts that print the same digest reuse each other's finished shards on one store; a long matrix can be
continued from a later commit when its digest equals the one the matrix started with (docs/benchmarks.md).
``python scripts/stage_hashes.py [--all]``
"""

from __future__ import annotations

import hashlib
import json
import sys

from ddpipe.stages import all_stages


def stage_hashes() -> dict[str, str]:
    return {f"{s.name}:{s.run.__name__}": s.code() for s in all_stages()}


if __name__ == "__main__":
    hashes = stage_hashes()
    if "--all" in sys.argv:
        for name, h in sorted(hashes.items()):
            print(f"{h}  {name}")
    print(hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:12])

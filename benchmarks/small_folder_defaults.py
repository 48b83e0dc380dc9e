"""A newcomer's short config on a small image folder unlike Fashion-MNIST: does the default RDED run stay level
with its random subset?

    python benchmarks/small_folder_defaults.py [--data data/small-folder] [--set key=value ...] [--old-defaults]

Makes the folder if missing (``scripts/small_folder.py``: Fashion-MNIST resized to 32 px, 150 train and 50 val
images per class, grayscale PNGs) and runs, with the plain engine and a temporary store, the config a newcomer writes::

    name: newcomer
    dataset: {kind: image-folder, root: <data>, image_size: 32, channels: 1}
    method: {name: rded, ipc: 10}

Everything else is ddpipe's defaults (10 teacher epochs, 300 student epochs, three seeds, the three regimes).
``--old-defaults`` sets the defaults of before issue 24 (``method.crop_scale: [0.08, 1]``, 5 crops per image).
Prints the results table (with its warnings) and the wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from small_folder import write_small_folder  # noqa: E402

OLD_DEFAULTS = ["method.crop_scale=[0.08, 1.0]", "method.crops_per_image=5"]


def newcomer_config(data: Path) -> dict:
    return {"name": "newcomer", "dataset": {"kind": "image-folder", "root": str(data), "image_size": 32, "channels": 1},
            "method": {"name": "rded", "ipc": 10}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(ROOT / "data" / "small-folder"))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--old-defaults", action="store_true")
    a = p.parse_args()
    data = Path(a.data)
    if not (data / "train").is_dir():
        write_small_folder(data)
    overrides = (OLD_DEFAULTS if a.old_defaults else []) + a.overrides
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "newcomer.yaml"
        config.write_text(yaml.safe_dump(newcomer_config(data)))
        cmd = [sys.executable, "-m", "ddpipe.cli", "run", str(config), "--store", str(Path(tmp) / "runs"),
               "--engine", "plain", "--no-progress"] + [x for o in overrides for x in ("--set", o)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        print(proc.stdout)
        report = json.loads(next((Path(tmp) / "runs").glob("newcomer-*/report.json")).read_text())
    print(json.dumps({"overrides": overrides, "wall_s": round(wall, 1), "warnings": report["warnings"],
                      "regimes": {r: {"distilled": e["distilled"], "random": e["random"]}
                                  for r, e in report["regimes"].items()}}, indent=1))


if __name__ == "__main__":
    main()

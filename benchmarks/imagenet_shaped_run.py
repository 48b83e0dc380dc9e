"""The ImageNet-geometry preset from a local S3 server, in each of the three layouts, and the same results from each.

    python benchmarks/imagenet_shaped_run.py [--data data/imagenet-shaped] [--layouts webdataset,parquet,image-folder]
                                             [--engine plain|prefect] [--config configs/imagenet-shaped-rded.yaml]

Makes the ImageNet-shaped set if ``--data`` has none (``scripts/imagenet_shaped.py``, 40 train and 20 val images
per class), starts moto's S3 server on loopback, uploads the layouts to ``s3://ddpipe-bench/imagenet-shaped/``, and
runs ``ddpipe run`` on the preset once per layout with ``dataset.root`` on S3 and the store on S3 too. Then it checks
that every layout's run wrote byte-identical distilled images and labels (``distilled/images/``,
``distilled/labels/``) and prints each run's time, teacher accuracy and results table (distilled vs random).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "ddpipe-bench"


def start_s3():
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    from moto.server import ThreadedMotoServer

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT / "data" / "imagenet-shaped"))
    p.add_argument("--layouts", default="webdataset,parquet,image-folder")
    p.add_argument("--engine", default="plain", choices=("plain", "prefect"))
    p.add_argument("--config", default=str(ROOT / "configs" / "imagenet-shaped-rded.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    layouts = args.layouts.split(",")
    data = Path(args.data)
    if not all((data / k).is_dir() for k in layouts):
        sys.path.insert(0, str(ROOT / "scripts"))
        from imagenet_shaped import write_imagenet_shaped

        print(write_imagenet_shaped(str(data), train_per_class=40, val_per_class=20))
    server, endpoint = start_s3()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    import s3fs

    fs = s3fs.S3FileSystem(key="bench", secret="bench", client_kwargs={"endpoint_url": endpoint})
    fs.mkdir(BUCKET)
    for kind in layouts:
        start = time.perf_counter()
        fs.put(str(data / kind), f"{BUCKET}/imagenet-shaped/{kind}", recursive=True)
        print(f"uploaded {kind} in {time.perf_counter() - start:.1f} s")
    runs = {}
    for kind in layouts:
        cmd = [sys.executable, "-m", "ddpipe.cli", "run", args.config, "--engine", args.engine, "--no-progress",
               "--store", f"s3://{BUCKET}/runs", "--set", f"dataset.kind={kind}",
               "--set", f"dataset.root=s3://{BUCKET}/imagenet-shaped/{kind}"]
        for o in args.overrides:
            cmd += ["--set", o]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        print(f"\n== {kind}: rc {proc.returncode}, {seconds:.0f} s\n{proc.stdout[-2500:]}{proc.stderr[-2500:]}")
        if proc.returncode:
            server.stop()
            sys.exit(proc.returncode)
        uri = next(line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("run folder:"))
        runs[kind] = uri.removeprefix("s3://")
    hashes = {}
    for kind, root in runs.items():
        files = sorted(fs.find(f"{root}/distilled/images") + fs.find(f"{root}/distilled/labels"))
        h = hashlib.sha256()
        for f in files:
            h.update(f.removeprefix(root).encode() + hashlib.sha256(fs.cat_file(f)).digest())
        hashes[kind] = (len(files), h.hexdigest()[:16])
        report = json.loads(fs.cat_file(f"{root}/report.json"))
        teacher = json.loads(fs.cat_file(f"{root}/teacher/metrics.json"))
        print(f"{kind}: {len(files)} distilled image and label files, sha256 {hashes[kind][1]}, teacher "
              f"{json.dumps({k: v for k, v in teacher.items() if 'acc' in k})}")
        print(json.dumps(report.get("regimes"), indent=None)[:1500])
    same = len(set(hashes.values())) == 1
    print(f"\nbyte-identical distilled images and labels across {', '.join(runs)}: {same}")
    server.stop()
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()

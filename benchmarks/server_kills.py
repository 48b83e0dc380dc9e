"""SIGKILL ``ddpipe run`` (Prefect engine, temporary server) mid-run N times; count the servers left running.

    python benchmarks/server_kills.py --kills 10                   # this checkout
    python benchmarks/server_kills.py --kills 10 --root /tmp/old   # another checkout (PYTHONPATH=<root>/src)

Each time: the smoke run (``configs/smoke.yaml``, a fresh store) starts in its own process, the benchmark waits
until the CLI has started its temporary Prefect server (a child process serving Prefect's app with uvicorn) and
then a further delay drawn from [0, 5] s (seeded), and SIGKILLs the CLI alone, as the OOM killer or
``kill -9 <pid>`` would (not its process group). After the last kill it waits ``--grace`` seconds and counts
which of the servers it saw are still alive, then ends them. Prints one JSON line per kill and a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except OSError:
                continue
    return out


def is_server(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return False
    return b"uvicorn" in args and any(a.endswith(b":create_app") for a in args)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--root", default=str(ROOT), help="the checkout whose CLI is run")
    p.add_argument("--grace", type=float, default=15.0, help="seconds to wait after the last kill")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    root = Path(args.root).resolve()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PYTHONPATH=f"{root / 'src'}{os.pathsep}{env.get('PYTHONPATH', '')}",
               PREFECT_HOME=tempfile.mkdtemp(prefix="ddpipe-kills-prefect-"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    servers: list[int] = []
    for k in range(args.kills):
        store = tempfile.mkdtemp(prefix="ddpipe-kills-")
        cli = subprocess.Popen([sys.executable, "-m", "ddpipe.cli", "run", str(root / "configs" / "smoke.yaml"),
                                "--engine", "prefect", "--no-progress", "--store", store], cwd=root, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start, found = time.monotonic(), []
        while not found and cli.poll() is None and time.monotonic() - start < 300:
            found = [c for c in children(cli.pid) if is_server(c)]
            time.sleep(0.1)
        delay = rng.uniform(0, 5)
        time.sleep(delay)
        running = cli.poll() is None
        cli.send_signal(signal.SIGKILL)
        cli.wait()
        servers += found
        print(json.dumps({"kill": k + 1, "cli": cli.pid, "servers": found, "killed_mid_run": running,
                          "seconds_to_server": round(time.monotonic() - start - delay, 1),
                          "delay_s": round(delay, 1)}), flush=True)
    time.sleep(args.grace)
    left = [s for s in servers if alive(s)]
    for s in left:
        os.kill(s, signal.SIGKILL)
    print(json.dumps({"root": str(root), "kills": args.kills, "servers_started": len(servers),
                      "servers_left_after_grace": len(left), "grace_s": args.grace}), flush=True)


if __name__ == "__main__":
    main()

"""CPU used by the temporary local Prefect server while a flow's shards compute (no API traffic).

    python benchmarks/server_idle_cpu.py [--seconds 60]

Starts the server the way ``ddpipe run`` does (Prefect's ephemeral subprocess server, SQLite), waits, and
prints the server process's CPU time over the wait as a fraction of one core.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect.server.api.server import SubprocessASGIServer  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=60.0)
    args = p.parse_args()
    server = SubprocessASGIServer()
    server.start()
    try:
        pid = server.server_process.pid
        c0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(args.seconds)
        c1, t1 = cpu_seconds(pid), time.monotonic()
    finally:
        server.stop()
    print(json.dumps({"seconds": round(t1 - t0, 1), "server_cpu_fraction_of_one_core": round((c1 - c0) / (t1 - t0), 4)}))


if __name__ == "__main__":
    main()

"""Object-store faults (issue 24): the smoke run through a proxy that answers about 10 % of S3 requests with
500 / 503 SlowDown (or loses the answer of a request the server carried out) and delays some. The S3 client's
retries (botocore standard mode, ddpipe.store.fs_options) and the Prefect task retries absorb them: the run
completes, byte-identical to a fault-free run, and nothing partial counts as done."""

import json

import pytest

from conftest import BUCKET, SMOKE, run_cli
from faultproxy import FaultProxy
from test_s3 import FAST, bucket_fs

pytestmark = [pytest.mark.slow, pytest.mark.fmnist]

VOLATILE = {"config.yaml", "run.json", "report.json"}  # the endpoint, the folder's token, stage seconds


def _objects(fs, root: str) -> dict[str, bytes]:
    return {p.removeprefix(root + "/"): fs.cat_file(p) for p in fs.find(root)
            if p.rsplit("/", 1)[-1] not in VOLATILE}


def _run(store: str, env: dict, engine: str):
    proc = run_cli("run", str(SMOKE), "--store", store, "--engine", engine, "--no-progress", *FAST,
                   "--set", "evaluation.regimes=[hard]", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next(line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("run folder:"))


def test_smoke_run_through_s3_faults_is_identical_to_a_fault_free_run(s3_endpoint, tmp_path):
    endpoint, creds = s3_endpoint
    clean = _run(f"s3://{BUCKET}/clean", {**creds, "AWS_ENDPOINT_URL": endpoint}, "plain")
    with FaultProxy(endpoint, seed=24) as proxy:
        env = {**creds, "AWS_ENDPOINT_URL": proxy.url, "PREFECT_HOME": str(tmp_path / "prefect")}
        faulty = _run(f"s3://{BUCKET}/faulty", env, "prefect")
    counts = proxy.counts
    print(f"fault proxy: {counts}")
    assert counts["faults"] >= 0.05 * counts["requests"] and counts["lost"] > 0 and counts["delayed"] > 0

    fs = bucket_fs(endpoint)
    a, b = _objects(fs, clean.removeprefix("s3://")), _objects(fs, faulty.removeprefix("s3://"))
    assert len(a) > 50 and a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    reports = [json.loads(fs.cat_file(f"{r.removeprefix('s3://')}/report.json")) for r in (clean, faulty)]
    assert reports[0]["regimes"] == reports[1]["regimes"]
    assert not fs.exists(f"{faulty.removeprefix('s3://')}/run.lock")  # released, even through faults

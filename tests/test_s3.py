"""The smoke run against an S3 server on loopback (moto's server mode) through s3fs, then resumed from S3."""

import json
import os

import pytest

from conftest import BUCKET, SMOKE, run_cli

pytestmark = pytest.mark.slow  # end to end: runs on moto's S3 server


FAST = ["--set", "evaluation.epochs=5", "--set", "evaluation.seeds=[0]"]


def bucket_fs(endpoint):
    import s3fs

    return s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint},
                             skip_instance_cache=True)


@pytest.mark.fmnist
def test_smoke_run_on_s3_then_resume(s3_endpoint, tmp_path):
    endpoint, creds = s3_endpoint
    env = {**creds, "AWS_ENDPOINT_URL": endpoint, "PREFECT_HOME": str(tmp_path / "prefect")}
    store = f"s3://{BUCKET}/runs"
    first = run_cli("run", str(SMOKE), "--store", store, "--no-progress", *FAST, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    run_uri = next(line.split(": ", 1)[1] for line in first.stdout.splitlines() if line.startswith("run folder:"))
    assert run_uri.startswith(f"s3://{BUCKET}/runs/smoke-")

    fs = bucket_fs(endpoint)
    root = run_uri.removeprefix("s3://")
    report = json.loads(fs.cat_file(f"{root}/report.json"))
    assert report["regimes"]["soft_kd"]["distilled"]["mean"] > 0
    assert len(fs.glob(f"{root}/distilled/images/*/*.png")) == 20
    records = {p: fs.info(p)["LastModified"] for p in fs.glob(f"{root}/manifests/*/*.parquet")}
    assert len(records) == 1 + 1 + 5 + 5 + 5 + 10 + 6

    status = run_cli("status", run_uri, env=env)
    assert status.returncode == 0 and "evaluation" in status.stdout and "6/6" in status.stdout

    # Resume from S3 on a machine with no Prefect cache (fresh PREFECT_HOME): every shard validates and is kept.
    env["PREFECT_HOME"] = str(tmp_path / "prefect2")
    second = run_cli("run", str(SMOKE), "--store", store, "--no-progress", *FAST, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    fs = bucket_fs(endpoint)
    assert {p: fs.info(p)["LastModified"] for p in fs.glob(f"{root}/manifests/*/*.parquet")} == records
    assert json.loads(fs.cat_file(f"{root}/report.json"))["regimes"] == report["regimes"]


@pytest.mark.fmnist
def test_endpoint_from_the_config(s3_endpoint, tmp_path):
    endpoint, creds = s3_endpoint
    env = {**creds, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("AWS_ENDPOINT_URL", None)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    proc = run_cli("run", str(SMOKE), "--store", f"s3://{BUCKET}/cfg-runs", "--engine", "plain", "--no-progress",
                   "--set", f"store.storage_options={{client_kwargs: {{endpoint_url: '{endpoint}'}}}}",
                   "--set", "evaluation.regimes=[hard]", *FAST, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert bucket_fs(endpoint).glob(f"{BUCKET}/cfg-runs/smoke-*/report.json")


def test_missing_bucket_is_a_one_line_error(s3_endpoint, tmp_path):
    endpoint, creds = s3_endpoint
    env = {**creds, "AWS_ENDPOINT_URL": endpoint, "PREFECT_HOME": str(tmp_path / "prefect")}
    proc = run_cli("run", str(SMOKE), "--store", "s3://no-such-bucket/runs", "--no-progress", env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "s3://no-such-bucket/runs" in lines[0] and "cannot be written" in lines[0]


@pytest.mark.fmnist
@pytest.mark.parametrize("engine", ["prefect"])  # the plain engine writes a subset of what Prefect's run writes
def test_credentials_appear_nowhere_in_the_run_folder_or_the_logs(s3_endpoint, tmp_path, engine):
    """A sentinel secret in the environment and another in store.storage_options: neither is written to the run
    folder (config.yaml holds "***"), report.json, the run's output or, under Prefect, anything in PREFECT_HOME
    (its database with the flow run's parameters, logs and results)."""
    endpoint, creds = s3_endpoint
    env_secret, option_secret = "SENTINEL-ENV-7f3a9c", "SENTINEL-OPT-51d2e8"  # moto accepts any secret
    env = {**creds, "AWS_SECRET_ACCESS_KEY": env_secret, "PREFECT_HOME": str(tmp_path / "prefect")}
    os.environ.pop("AWS_ENDPOINT_URL", None)
    options = f"{{key: testing, secret: {option_secret}, client_kwargs: {{endpoint_url: '{endpoint}'}}}}"
    proc = run_cli("run", str(SMOKE), "--store", f"s3://{BUCKET}/secret-runs-{engine}", "--engine", engine,
                   "--set", f"store.storage_options={options}", "--set", "evaluation.regimes=[hard]", *FAST, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fs = bucket_fs(endpoint)
    files = fs.find(f"{BUCKET}/secret-runs-{engine}")
    assert any(f.endswith("/config.yaml") for f in files) and any(f.endswith("/report.json") for f in files)
    for f in files:
        data = fs.cat_file(f)
        assert env_secret.encode() not in data and option_secret.encode() not in data, f
    assert b"secret: '***'" in fs.cat_file(next(f for f in files if f.endswith("/config.yaml")))
    for text in (proc.stdout, proc.stderr):
        assert env_secret not in text and option_secret not in text
    home = [p for p in (tmp_path / "prefect").rglob("*") if p.is_file()]
    assert (engine == "prefect") == any(p.name.startswith("prefect.db") for p in home)
    for p in home:  # the SQLite database (flow-run parameters, task inputs, logs), results, settings
        data = p.read_bytes()
        assert env_secret.encode() not in data and option_secret.encode() not in data, p

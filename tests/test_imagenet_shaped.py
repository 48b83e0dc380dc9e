"""The ImageNet-geometry preset (224 px, RDED factor 2 with region soft labels, a ResNet-18 teacher) on the
ImageNet-shaped set, read from moto's S3 server in each of the three layouts: byte-identical distilled images and
labels from all three; the Prefect engine killed mid-run resumes to the same outputs; ``ddpipe status`` reads it."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import BUCKET, CONFIGS, ROOT, run_cli

sys.path.insert(0, str(ROOT / "scripts"))
from imagenet_shaped import write_imagenet_shaped  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.fmnist]
PRESET = CONFIGS / "imagenet-shaped-rded.yaml"
# The preset's geometry and models, with fewer images, steps and students so that a run takes about a minute.
QUICK = ["dataset.train_per_class=12", "dataset.test_per_class=4", "teacher.epochs=1", "teacher.batch_size=12",
         "method.ipc=1", "method.candidates_per_class=6", "evaluation.epochs=2", "evaluation.regimes=[hard,soft_kd]",
         "evaluation.model.width=8", "orchestration.classes_per_shard=1", "runtime.loader_workers=1",
         "labels.top_k=null"]  # 3 classes: the preset's top-5 labels are refused (above the class count)


def fs_of(endpoint):
    import s3fs

    return s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint},
                             skip_instance_cache=True)


@pytest.fixture(scope="module")
def shaped_s3(s3_endpoint, tmp_path_factory):
    endpoint, creds = s3_endpoint
    out = tmp_path_factory.mktemp("shaped")
    write_imagenet_shaped(str(out), classes=3, train_per_class=12, val_per_class=4, shard_size=7, row_group_size=4)
    fs_of(endpoint).put(str(out), f"{BUCKET}/imagenet-shaped", recursive=True)
    return endpoint, {**creds, "AWS_ENDPOINT_URL": endpoint}


def args(kind: str, store: str, engine: str = "plain") -> list[str]:
    out = ["run", str(PRESET), "--store", store, "--engine", engine, "--no-progress",
           "--set", f"dataset.kind={kind}", "--set", f"dataset.root=s3://{BUCKET}/imagenet-shaped/{kind}"]
    for s in QUICK:
        out += ["--set", s]
    return out


def distilled(fs, run_uri: str) -> dict[str, str]:
    root = run_uri.removeprefix("s3://")
    files = fs.find(f"{root}/distilled/images") + fs.find(f"{root}/distilled/labels")
    return {f.removeprefix(root): hashlib.sha256(fs.cat_file(f)).hexdigest() for f in files}


def run_folder(stdout: str) -> str:
    return next(line.split(": ", 1)[1] for line in stdout.splitlines() if line.startswith("run folder:"))


def test_three_layouts_from_s3_give_the_same_distilled_set(shaped_s3, tmp_path):
    endpoint, env = shaped_s3
    fs = fs_of(endpoint)
    results = {}
    for kind in ("webdataset", "parquet", "image-folder"):
        proc = run_cli(*args(kind, f"s3://{BUCKET}/runs"), env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        uri = run_folder(proc.stdout)
        results[kind] = distilled(fs, uri)
        assert len([p for p in results[kind] if p.endswith(".png")]) == 3  # 3 classes x ipc 1, 224 px
        report = fs.cat_file(f"{uri.removeprefix('s3://')}/report.json")
        assert b'"soft_kd"' in report
    assert results["webdataset"] == results["parquet"] == results["image-folder"]
    from PIL import Image
    import io

    png = fs.cat_file(f"{uri.removeprefix('s3://')}/distilled/images/00000/class00000_id00000.png")
    assert Image.open(io.BytesIO(png)).size == (224, 224)


def test_prefect_run_killed_mid_stage_resumes_to_the_same_outputs(shaped_s3, tmp_path):
    endpoint, env = shaped_s3
    fs = fs_of(endpoint)
    plain = run_cli(*args("webdataset", f"s3://{BUCKET}/runs-plain"), env=env)
    assert plain.returncode == 0, plain.stderr[-3000:]
    reference = distilled(fs, run_folder(plain.stdout))

    store = f"s3://{BUCKET}/runs-killed"
    env = {**os.environ, **env, "PREFECT_HOME": str(tmp_path / "prefect")}
    cmd = [sys.executable, "-m", "ddpipe.cli", *args("webdataset", store, "prefect")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    records = []
    while time.time() < deadline and proc.poll() is None:
        records = fs.glob(f"{BUCKET}/runs-killed/imagenet-shaped-rded-*/manifests/scoring/*.parquet")
        if records:
            break
        time.sleep(0.2)
        fs.invalidate_cache()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert records and len(records) < 3, f"kill did not land mid-stage ({len(records)} of 3 scoring shards)"
    run_uri = "s3://" + records[0].split("/manifests/")[0]
    assert not fs.exists(f"{run_uri.removeprefix('s3://')}/manifests/scoring.parquet")

    status = run_cli("status", run_uri, env=env)
    assert status.returncode == 0 and "scoring" in status.stdout, status.stderr[-2000:]
    resumed = run_cli(*args("webdataset", store, "prefect"), env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert distilled(fs, run_uri) == reference
    status = run_cli("status", run_uri, env=env)
    assert status.returncode == 0 and "pending" not in status.stdout and "stopped" not in status.stdout, status.stdout


def test_s3_source_without_credentials_is_one_line(shaped_s3, tmp_path):
    endpoint, _ = shaped_s3
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {"AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE":
            str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none")}
    proc = subprocess.run([sys.executable, "-m", "ddpipe.cli", *args("webdataset", str(tmp_path / "runs"))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "s3://ddpipe-test/imagenet-shaped/webdataset/train" in lines[0], proc.stderr[-2000:]
    assert "credentials" in lines[0].lower()
    assert not list((tmp_path / "runs").glob("*/manifests/*.parquet"))  # nothing marked done

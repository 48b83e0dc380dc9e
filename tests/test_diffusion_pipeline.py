"""The diffusion method through the pipeline: every stage, the quality report, selection rules, and a
training run killed with SIGKILL that resumes from its last checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from ddpipe.config import load_config
from ddpipe.dataindex import open_source
from ddpipe.errors import DataError
from ddpipe.methods.diffusion.denoiser import Space, loss_log, train_denoiser
from ddpipe.pipeline import run_store
from ddpipe.runner import run_pipeline

from conftest import CONFIGS, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.fmnist]  # end to end: the diffusion pipeline

FAST = ["evaluation.epochs=5", "evaluation.seeds=[0]", "evaluation.regimes=[hard]"]


def preset(store: Path, *overrides: str):
    return load_config(CONFIGS / "smoke-diffusion.yaml", [f"store.uri={store}", *FAST, *overrides])


def test_diffusion_runs_every_stage_and_reports_quality(tmp_path):
    cfg = preset(tmp_path / "runs")
    report = run_pipeline(cfg)
    folder = Path(run_store(cfg).root)
    assert list(report["stages"]) == ["dataset", "teacher", "diffusion", "generation", "quality", "synthesis",
                                      "random_subset", "labels", "evaluation"]
    training = json.loads((folder / "diffusion/training.json").read_text())
    assert training["steps"] == 60 and training["resumed_from_step"] == 0 and len(training["loss_every_50_steps"]) == 2
    assert len(list((folder / "generated/images/00004").iterdir())) == 6
    g = report["generation"]
    assert g["generated_images"] == 60 and g["reference_images"] == 100 and g["images_per_second"] > 0
    assert 0 <= g["teacher_accuracy"] <= 1 and len(g["teacher_accuracy_per_class"]) == 10
    assert g["frechet_distance"] > 0
    assert (folder / "generation/grid.png").stat().st_size > 0
    rows = pq.read_table(folder / "distilled/provenance/class=00004.parquet").to_pylist()
    assert [r["ipc_index"] for r in rows] == [0, 1]
    # realism keeps the generated images with the lowest teacher cross-entropy, in order
    assert rows[0]["score"] <= rows[1]["score"] and rows[0]["source_id"].startswith("generated/images/00004/")
    states = next((tmp_path / "runs" / "shared" / "diffusion-states").iterdir())
    assert sorted(p.name for p in states.iterdir()) == ["step-00000060.pt"]  # checkpoints replaced, final kept

    # another selection rule reuses the trained denoiser (shared in the store) and picks other images
    random_cfg = preset(tmp_path / "runs", "method.diffusion.select=random")
    again = run_pipeline(random_cfg)
    assert json.loads((Path(run_store(random_cfg).root) / "diffusion/training.json").read_text()) == training
    assert again["generation"]["frechet_distance"] == g["frechet_distance"]  # same denoiser, seed: same pool
    assert (Path(run_store(random_cfg).root) / "generation/quality.json").read_bytes() == \
        (folder / "generation/quality.json").read_bytes()
    # ... and the generated pool, sampled once: the second run's timing record is the first one's
    assert len(list((tmp_path / "runs" / "shared" / "generated").iterdir())) == report["stages"]["generation"]["shards"]
    for name in ("generation/classes-00004-00005.json", "generated/images/00004/class00004_id00005.png"):
        assert (Path(run_store(random_cfg).root) / name).read_bytes() == (folder / name).read_bytes()

    # a longer run of the same recipe trains on from the 60-step state and ends where one from scratch would
    longer = preset(tmp_path / "runs", "method.diffusion.steps=110")
    run_pipeline(longer)
    trained = json.loads((Path(run_store(longer).root) / "diffusion/training.json").read_text())
    assert trained["resumed_from_step"] == 60 and trained["steps"] == 110
    assert sorted(p.name for p in states.iterdir()) == ["step-00000060.pt", "step-00000110.pt"]
    cpu, dc = torch.device("cpu"), longer.method.diffusion
    scratch = train_denoiser(dc, open_source(longer).train, Space(dc, longer.image_size, longer.channels, cpu), 10,
                             longer.seed, cpu, longer.runtime)
    ema = torch.load(Path(run_store(longer).root) / "diffusion/denoiser.pt", weights_only=True)["ema"]
    assert all(torch.equal(ema[k], scratch["ema"][k]) for k in scratch["ema"])
    assert trained["loss_every_50_steps"] == [round(v, 6) for v in loss_log(scratch)]


def test_too_few_generated_images_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="class 0: 6 generated images, fewer than method.ipc=8"):
        run_pipeline(preset(tmp_path / "runs", "method.ipc=8"))


def test_killed_training_resumes_from_its_last_checkpoint(tmp_path):
    settings = [*FAST, "method.diffusion.steps=400", "method.diffusion.checkpoint_every=50"]
    store = tmp_path / "runs"
    cmd = [sys.executable, "-m", "ddpipe.cli", "run", str(CONFIGS / "smoke-diffusion.yaml"), "--store", str(store),
           "--engine", "plain", "--no-progress"]
    for s in settings:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    shared = store / "shared" / "diffusion-states"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if shared.is_dir() and any(list(d.glob("step-*.pt")) for d in shared.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before its first training checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    cfg = preset(store, *settings)
    folder = Path(run_store(cfg).root)
    assert not (folder / "diffusion/denoiser.pt").exists()  # a killed stage leaves nothing that looks complete

    report = run_pipeline(cfg)
    training = json.loads((folder / "diffusion/training.json").read_text())
    assert training["steps"] == 400 and training["resumed_from_step"] >= 50
    assert training["resumed_from_step"] % 50 == 0
    assert [p.name for p in shared.glob("*/*")] == ["step-00000400.pt"]  # the killed run's checkpoint replaced
    assert report["stages"]["synthesis"]["shards"] == 5

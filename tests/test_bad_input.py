"""Bad input: one clear line on stderr naming the problem, exit status 2, nothing marked complete."""

from pathlib import Path

import pytest
import yaml

from conftest import SMOKE, run_cli
from test_data import write_image_folder

pytestmark = pytest.mark.slow  # end to end: each bad input through the CLI


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("ddpipe: error: ")
    for f in fragments:
        assert f in lines[0], lines[0]


def run(tmp_path, *args, config=SMOKE, engine="prefect"):
    return run_cli("run", str(config), "--store", str(tmp_path / "runs"), "--no-progress", "--engine", engine, *args,
                   env={"PREFECT_HOME": str(tmp_path / "prefect")})


def test_invalid_config_field(tmp_path):
    assert_one_line_error(run(tmp_path, "--set", "labels.dtype=int8"), "labels.dtype")
    assert_one_line_error(run(tmp_path, "--set", "teacher.epochz=3"), "unknown config field 'teacher.epochz'")
    assert not (tmp_path / "runs").exists()


def test_missing_dataset_names_the_install_hint(tmp_path):
    proc = run(tmp_path, "--set", f"dataset.root={tmp_path / 'nowhere'}")
    assert_one_line_error(proc, "Fashion-MNIST IDX files not found", "apt-get install dataset-fashion-mnist")


@pytest.mark.fmnist
def test_ipc_larger_than_a_class_has_images(tmp_path):
    proc = run(tmp_path, "--set", "method.ipc=120", "--set", "method.candidates_per_class=300")
    assert_one_line_error(proc, "method.ipc=120", "class 'T-shirt/top' has 90 after 10 held out for validation")


def test_unwritable_store(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = run_cli("run", str(SMOKE), "--store", str(blocker / "runs"), "--no-progress")
    assert_one_line_error(proc, str(blocker / "runs"), "cannot be written")


def folder_config(tmp_path: Path, root: Path, **teacher) -> Path:
    cfg = {
        "name": "folder",
        "dataset": {"kind": "image-folder", "root": str(root), "image_size": 28, "channels": 1},
        "teacher": {"model": {"name": "convnet", "width": 8, "depth": 2, "norm": "batch"}, "epochs": 1,
                    "batch_size": 8, **teacher},
        "method": {"ipc": 1, "candidates_per_class": 6, "crops_per_image": 2},
        "evaluation": {"model": {"name": "convnet", "width": 8, "depth": 2}, "epochs": 2, "seeds": [0]},
    }
    path = tmp_path / "folder.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.fmnist
def test_corrupt_image_is_named_and_nothing_is_marked_complete(tmp_path):
    root = write_image_folder(tmp_path / "data")
    bad = root / "train" / "n00000001" / "img002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    proc = run(tmp_path, config=folder_config(tmp_path, root))
    assert_one_line_error(proc, f"cannot read image {bad}")
    folder = next((tmp_path / "runs").glob("folder-*"))  # the run folder (shared/ holds the dataset index)
    manifests = {p.relative_to(folder).as_posix() for p in (folder / "manifests").rglob("*.parquet")}
    assert manifests == {"manifests/plan.parquet", "manifests/dataset.parquet", "manifests/dataset/dataset.parquet"}
    assert not (folder / "report.json").exists()


@pytest.mark.fmnist
def test_teacher_checkpoint_for_another_class_map(tmp_path, trained_teacher, session_dir):
    # A real Fashion-MNIST teacher, offered for an image folder whose classes are WordNet ids.
    root = write_image_folder(tmp_path / "data")
    config = folder_config(tmp_path, root, checkpoint=str(session_dir / "teacher.pt"))
    proc = run(tmp_path, config=config)
    assert_one_line_error(proc, "teacher.pt", "another class map", "'n00000000' in the data")
    assert not list((tmp_path / "runs").rglob("teacher.pt"))


@pytest.mark.fmnist
def test_missing_teacher_checkpoint(tmp_path):
    proc = run(tmp_path, "--set", f"teacher.checkpoint={tmp_path / 'missing.pt'}", engine="plain")
    assert_one_line_error(proc, "teacher checkpoint not found", "missing.pt")

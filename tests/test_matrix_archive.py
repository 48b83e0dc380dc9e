"""benchmarks/matrix_archive.py: the durable part of a matrix store, including a denoiser's training state while
it trains, so the 2 h of denoiser training can be spread over sessions whose disks do not last."""

from __future__ import annotations

import importlib.util
import json

import torch

from conftest import ROOT

_spec = importlib.util.spec_from_file_location("matrix_archive", ROOT / "benchmarks" / "matrix_archive.py")
archive = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(archive)


def _state(folder, step, final=False):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "final": final, "model": {"w": torch.full((3,), float(step))}},
               folder / f"step-{step:08d}.pt")


def _steps(folder):
    return sorted(int(p.name[5:13]) for p in folder.glob("step-*.pt"))


def test_archive_keeps_only_the_latest_unfinished_denoiser_state_and_restores_it(tmp_path):
    store, arch, fresh = tmp_path / "store", tmp_path / "archive", tmp_path / "fresh"
    traj = "shared/diffusion-states/abc"
    _state(store / traj, 1000)
    archive.copy(store, arch)
    assert _steps(arch / traj) == [1000]
    # training went on in the store (a checkpoint replaces the previous one): the archive follows
    (store / traj / "step-00001000.pt").unlink()
    _state(store / traj, 1500)
    assert archive.copy(store, arch) == 1
    assert _steps(arch / traj) == [1500]  # the older state left the archive
    # a fresh store gets the state back, and the denoiser resumes from its weights
    archive.copy(arch, fresh)
    got = torch.load(fresh / traj / "step-00001500.pt", weights_only=False)
    assert got["step"] == 1500 and got["model"]["w"].tolist() == [1500.0] * 3
    # an archive never replaces a state that trained further
    _state(fresh / traj, 2000)
    (fresh / traj / "step-00001500.pt").unlink()
    assert archive.copy(arch, fresh) == 0
    assert _steps(fresh / traj) == [2000]


def test_archive_drops_the_training_state_once_the_denoiser_is_trained(tmp_path):
    store, arch = tmp_path / "store", tmp_path / "archive"
    traj = "shared/diffusion-states/abc"
    _state(store / traj, 1000)
    archive.copy(store, arch)
    # the run finished: the final state is kept in the store, the EMA weights are the shared output
    (store / traj / "step-00001000.pt").unlink()
    _state(store / traj, 3000, final=True)
    weights = store / "shared/diffusion/key1"
    weights.mkdir(parents=True)
    (weights / "denoiser.pt").write_bytes(b"ema")
    (weights / "index.json").write_text(json.dumps({"denoiser.pt": "x"}))
    archive.copy(store, arch)
    assert _steps(arch / traj) == []  # the final state (20 MB) is not archived and the stale one is gone
    assert (arch / "shared/diffusion/key1/denoiser.pt").read_bytes() == b"ema"
    assert (arch / "shared/diffusion/key1/index.json").exists()

"""Copy the small, durable part of a matrix store into a folder, or back into a fresh store.

``python benchmarks/matrix_archive.py STORE ARCHIVE`` after each cell; ``python benchmarks/matrix_archive.py
ARCHIVE STORE`` before continuing a matrix on a machine whose store was lost.

Copied: every run folder's ``config.yaml`` and ``report.json`` (a finished cell, as
:func:`ddpipe.matrix.finished_run` finds it), and the outputs shared by the runs of a store that are small and
costly: the trained teachers (``shared/teachers``), the reference students' results (``shared/baselines``: one
``result.json`` per random-subset or full-set student), the training dynamics and statistic moments of the
selection and recovery methods (``shared/dynamics``, ``shared/moments``), the trained denoiser's EMA weights
(``shared/diffusion``, 5 MB on Fashion-MNIST) and, while a denoiser is still training, its latest training state
(``shared/diffusion-states/<key>/step-N.pt``, about 20 MB: the newest one that is not final; older states of
the same trajectory are removed from the destination, and a state is not copied over a newer one), so the 2 h
of denoiser training can be spread over sessions. Not copied: distilled images, soft labels, the distilled
students and generated pools (large; a cell that was not finished computes them again). With the archive
copied into a fresh store a matrix resumes without retraining its teacher, any finished reference student or
the steps its denoiser had done, and ``ddpipe evaluate MATRIX --store ARCHIVE --report-only`` gives the report
of every finished cell. Files already in the destination with the same bytes are left alone.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import torch

SHARED = ("teachers", "baselines", "dynamics", "moments", "diffusion")
STATE = re.compile(r"step-(\d{8})\.pt")  # ddpipe.methods.diffusion.training.state_name


def latest_training_state(folder: Path) -> Path | None:
    """The newest denoiser training state in ``folder`` unless it is the final one (the trained weights are
    then in ``shared/diffusion``)."""
    found = states(folder)
    if not found or torch.load(found[-1], map_location="cpu", weights_only=False).get("final"):
        return None
    return found[-1]


def states(folder: Path) -> list[Path]:
    """The training states in ``folder``, oldest first (none when it does not exist)."""
    return sorted(p for p in folder.glob("step-*.pt") if STATE.fullmatch(p.name))


def durable_files(root: Path) -> list[Path]:
    """The files of store ``root`` that the archive holds, relative to it."""
    files = [p for name in ("config.yaml", "report.json") for p in root.glob(f"*/{name}") if p.parent.name != "shared"]
    for kind in SHARED:
        # a shared folder counts once its index.json is written (pipeline.shared_outputs writes it last)
        for index in root.glob(f"shared/{kind}/*/index.json"):
            files += [p for p in index.parent.iterdir() if p.is_file() and p.name != ".lock"]
    files += [p for folder in root.glob("shared/diffusion-states/*") if (p := latest_training_state(folder))]
    return sorted(p.relative_to(root) for p in files)


def copy(src: Path, dst: Path) -> int:
    n = 0
    for rel in durable_files(src):
        target = dst / rel
        if target.exists() and target.read_bytes() == (src / rel).read_bytes():
            continue
        others = states(target.parent) if STATE.fullmatch(rel.name) else []
        if others and others[-1].name > rel.name:
            continue  # the destination's denoiser has trained further
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(src / rel, tmp)
        tmp.replace(target)
        for old in others:
            if old.name < rel.name:
                old.unlink()
        n += 1
    for folder in src.glob("shared/diffusion-states/*"):
        found = states(folder)
        if found and latest_training_state(folder) is None:  # trained: its weights are in shared/diffusion
            for old in states(dst / folder.relative_to(src)):
                if old.name < found[-1].name:
                    old.unlink()
    return n


if __name__ == "__main__":
    if len(sys.argv) != 3 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python benchmarks/matrix_archive.py SOURCE_FOLDER DESTINATION_FOLDER")
    print(f"{copy(Path(sys.argv[1]), Path(sys.argv[2]))} files copied")

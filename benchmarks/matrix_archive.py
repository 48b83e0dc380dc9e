"""Copy the small, durable part of a matrix store into a folder, or back into a fresh store.

``python benchmarks/matrix_archive.py STORE ARCHIVE`` after each cell; ``python benchmarks/matrix_archive.py
ARCHIVE STORE`` before continuing a matrix on a machine whose store was lost.

Copied: every run folder's ``config.yaml`` and ``report.json`` (a finished cell, as
:func:`ddpipe.matrix.finished_run` finds it), and the outputs shared by the runs of a store that are small and
costly: the trained teachers (``shared/teachers``), the reference students' results (``shared/baselines``: one
``result.json`` per random-subset or full-set student), the training dynamics and statistic moments of the
selection and recovery methods (``shared/dynamics``, ``shared/moments``). Not copied: distilled images, soft
labels, the distilled students, generated pools and denoisers (large; a cell that was not finished computes them
again). With the archive copied into a fresh store a matrix resumes without retraining its teacher or any
finished reference student, and ``ddpipe evaluate MATRIX --store ARCHIVE --report-only`` gives the report of
every finished cell. Files already in the destination with the same bytes are left alone.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

SHARED = ("teachers", "baselines", "dynamics", "moments")


def durable_files(root: Path) -> list[Path]:
    """The files of store ``root`` that the archive holds, relative to it."""
    files = [p for name in ("config.yaml", "report.json") for p in root.glob(f"*/{name}") if p.parent.name != "shared"]
    for kind in SHARED:
        # a shared folder counts once its index.json is written (pipeline.shared_outputs writes it last)
        for index in root.glob(f"shared/{kind}/*/index.json"):
            files += [p for p in index.parent.iterdir() if p.is_file() and p.name != ".lock"]
    return sorted(p.relative_to(root) for p in files)


def copy(src: Path, dst: Path) -> int:
    n = 0
    for rel in durable_files(src):
        target = dst / rel
        if target.exists() and target.read_bytes() == (src / rel).read_bytes():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(src / rel, tmp)
        tmp.replace(target)
        n += 1
    return n


if __name__ == "__main__":
    if len(sys.argv) != 3 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python benchmarks/matrix_archive.py SOURCE_FOLDER DESTINATION_FOLDER")
    print(f"{copy(Path(sys.argv[1]), Path(sys.argv[2]))} files copied")

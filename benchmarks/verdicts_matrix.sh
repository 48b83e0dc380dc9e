#!/usr/bin/env bash
# Issues 25 and 26: the verdicts matrix (and the refine matrix's cells) one cell at a time, each archived as it
# finishes (benchmarks/matrix_archive.py), in the order used: RDED, FADRM, herding and k-center at IPC 10, the
# refine matrix (issue 26) at IPC 10, 1 and 50, then every verdicts cell at IPC 10, 1 and 50 (G-VBSM at IPC 1 and 50,
# about 70 min each with its own reference students, after the others), diffusion last.
# A cell whose report the store holds is skipped (--report-only finds it) when the order reaches it again. Run it
# from a frozen clone of the commit the matrix started with (or a later one whose scripts/stage_hashes.py prints the
# same digest):
#
#   benchmarks/verdicts_matrix.sh STORE ARCHIVE       # e.g. /work/v10 <main>/benchmarks/results/fashion-mnist-verdicts
#
# The archive is copied into STORE first, so a store lost with its machine costs only the unfinished cells.
# Finished cells and shards are read from the cache; it can be killed and run again at any point.
set -u
S=${1:?store folder}; A=${2:?archive folder}
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src:$PWD
[ -d "$A" ] && $PY benchmarks/matrix_archive.py "$A" "$S"
cell() { matrix=$1; ipc=$2; shift 2; for m in "$@"; do
  # a finished cell is skipped: running it again took about 4 min a cell on this box (2026-12-05)
  if $PY -m ddpipe.cli evaluate "configs/matrix/$matrix.yaml" --store "$S" --ipc "$ipc" --methods "$m" --report-only \
      2>/dev/null | grep -q "(1 finished cells, 0 pending)"; then
    echo "=== $(date -u +%H:%M:%S) $matrix ipc $ipc $m: finished"; continue
  fi
  echo "=== $(date -u +%H:%M:%S) $matrix ipc $ipc $m"
  $PY -m ddpipe.cli evaluate "configs/matrix/$matrix.yaml" --engine plain --store "$S" --ipc "$ipc" --methods "$m" \
      --no-progress 2>&1 | grep -v Warning | tail -25
  $PY benchmarks/matrix_archive.py "$S" "$A"
done; }
SELECTION="herding kcenter random ca2d cad el2n forgetting sre2l cda"
cell fashion-mnist-verdicts 10 rded
cell fashion-mnist-refine 10 refine-fadrm
cell fashion-mnist-verdicts 10 herding kcenter
cell fashion-mnist-refine 10 rded refine-random refine-cim refine-edc
cell fashion-mnist-refine 1 rded refine-fadrm
cell fashion-mnist-refine 50 rded refine-fadrm
cell fashion-mnist-verdicts 10 $SELECTION gvbsm
cell fashion-mnist-verdicts 1 rded $SELECTION
cell fashion-mnist-verdicts 50 rded $SELECTION
cell fashion-mnist-verdicts 1 gvbsm
cell fashion-mnist-verdicts 50 gvbsm
cell fashion-mnist-verdicts 1 diffusion
cell fashion-mnist-verdicts 10 diffusion
cell fashion-mnist-verdicts 50 diffusion
echo "=== $(date -u +%H:%M:%S) done"

#!/usr/bin/env bash
# The GPU code paths, end to end: every method family's smoke preset on CUDA with bf16 autocast and
# channels_last (RDED also with torch.compile), through the plain engine, then the same smoke run on the CPU
# for comparison. Prints each run's results table and wall time.
#
#   benchmarks/gpu_smoke.sh [STORE] [--set key=value ...]     (run on a machine with a CUDA GPU)
#
# STORE defaults to /tmp/ddpipe-gpu-smoke. Extra --set options go to every run (e.g. --set dataset.root=DIR).
set -euo pipefail
STORE=${1:-/tmp/ddpipe-gpu-smoke}
shift || true
PY=${PYTHON:-python3}
GPU=(--set runtime.device=cuda --set runtime.amp=true --set runtime.channels_last=true)

run() {  # label, store, then ddpipe run arguments
    local label=$1 store=$2
    shift 2
    local t0=$SECONDS
    $PY -m ddpipe.cli run "$@" --engine plain --no-progress --store "$store" "${EXTRA[@]}"
    echo "== $label: $((SECONDS - t0)) s"
}

EXTRA=("$@")
$PY -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)'
run "rded cuda amp channels_last compile" "$STORE" configs/smoke.yaml "${GPU[@]}" --set runtime.compile=true
run "sre2l cuda amp channels_last" "$STORE" configs/smoke-sre2l.yaml "${GPU[@]}"
run "cda cuda amp channels_last" "$STORE" configs/smoke-sre2l.yaml "${GPU[@]}" --set name=smoke-cda --set method.name=cda \
    --set 'method.recovery.curriculum={scheduler: cosine, milestone: 1.0, beta_l: 0.4, beta_u: 1.0, gamma: 0.6}'
run "gvbsm cuda amp channels_last" "$STORE" configs/smoke-gvbsm.yaml "${GPU[@]}"
run "herding cuda amp channels_last" "$STORE" configs/smoke.yaml "${GPU[@]}" --set name=smoke-herding --set method.name=herding
run "cad cuda amp channels_last" "$STORE" configs/smoke.yaml "${GPU[@]}" --set name=smoke-cad --set method.name=cad
run "rded cpu (own store: nothing shared with the GPU runs)" "$STORE-cpu" configs/smoke.yaml --set runtime.device=cpu

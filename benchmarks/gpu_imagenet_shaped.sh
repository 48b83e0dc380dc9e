#!/usr/bin/env bash
# The ImageNet-geometry path on a GPU, one command: the imagenet-shaped RDED preset on CUDA (bf16, channels_last,
# JPEGs decoded on the device by the training and evaluation loaders), then the scoring stage's images/s against
# the teacher's bare forward pass on the same crops (benchmarks/scoring_throughput.py), with 0 and 2 loader workers,
# then refine's synthesis time per image against RDED's (configs/imagenet-shaped-refine.yaml, issue 26).
#
#   benchmarks/gpu_imagenet_shaped.sh [DATA] [STORE]     (on a machine with a CUDA GPU)
#
# DATA (default data/imagenet-shaped) must hold the set's webdataset/ layout; it is made with
# scripts/imagenet_shaped.py when missing (that needs Fashion-MNIST). STORE defaults to /tmp/ddpipe-gpu-imagenet.
set -euo pipefail
DATA=${1:-data/imagenet-shaped}
STORE=${2:-/tmp/ddpipe-gpu-imagenet}
PY=${PYTHON:-python3}
$PY -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)'
[ -d "$DATA/webdataset" ] || $PY scripts/imagenet_shaped.py "$DATA" --train-per-class 40 --val-per-class 20 --layouts webdataset
GPU=(--set runtime.device=cuda --set runtime.amp=true --set runtime.channels_last=true --set "dataset.root=$DATA/webdataset")
t0=$SECONDS
$PY -m ddpipe.cli run configs/imagenet-shaped-rded.yaml --engine plain --no-progress --store "$STORE" "${GPU[@]}" \
    --set runtime.gpu_decode=true
echo "== imagenet-shaped-rded on cuda with device decode: $((SECONDS - t0)) s"
for w in 0 2; do
    $PY benchmarks/scoring_throughput.py --config configs/imagenet-shaped-rded.yaml "${GPU[@]}" \
        --set "store.uri=$STORE" --set runtime.loader_workers=$w --set method.candidates_per_class=40
done
# refine (the FADRM preset at ImageNet geometry) against RDED: synthesis seconds per image on the same teacher.
TEACHER=$(ls "$STORE"/shared/teachers/*/teacher.pt | head -1)
$PY benchmarks/synthesis_time.py --store "$STORE-synth" --config configs/imagenet-shaped-rded.yaml \
    configs/imagenet-shaped-refine.yaml "${GPU[@]}" --set "teacher.checkpoint=$TEACHER"

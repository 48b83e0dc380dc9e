#!/usr/bin/env bash
# Install the real Fashion-MNIST IDX files (Debian package dataset-fashion-mnist) if they are missing.
set -euo pipefail
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
sudo=""
if [ "$(id -u)" != "0" ]; then sudo="sudo"; fi
echo "installing Fashion-MNIST into $dir (apt-get install dataset-fashion-mnist)"
$sudo apt-get update -qq
$sudo apt-get install -y -qq dataset-fashion-mnist
test -f "$dir/train-images-idx3-ubyte.gz"

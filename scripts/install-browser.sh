#!/usr/bin/env bash
# Install headless Chromium (Debian package chromium) for the UI test if it is missing.
set -euo pipefail
if command -v chromium >/dev/null; then
  exit 0
fi
sudo=""
if [ "$(id -u)" != "0" ]; then sudo="sudo"; fi
echo "installing chromium for the UI test (apt-get install chromium)"
$sudo apt-get update -qq
$sudo apt-get install -y -qq chromium >/dev/null
command -v chromium >/dev/null

#!/usr/bin/env bash
# Installs Debian's dataset-fashion-mnist when it is missing and this user can; otherwise says so loudly.
# The demo then falls back to scikit-learn's digits and prints that it did.
set -u
dir="$1"
[ -d "$dir" ] && exit 0
if command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    apt-get install -y dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update >/dev/null 2>&1 && apt-get install -y dataset-fashion-mnist >/dev/null 2>&1; }
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo apt-get install -y dataset-fashion-mnist >/dev/null 2>&1
  fi
fi
[ -d "$dir" ] && exit 0
echo "WARNING: Fashion-MNIST not found at $dir and could not be installed" >&2
echo "         (apt-get install dataset-fashion-mnist); the demo runs on scikit-learn's digits instead." >&2
exit 0

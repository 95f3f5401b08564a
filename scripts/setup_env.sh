#!/usr/bin/env bash
# Creates .venv beside this repository and installs PyTorch and the project into it.
# Idempotent: a second run with an unchanged pyproject.toml installs nothing.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

# Install torch before the project: a bare `torch` requirement in a fresh environment pulls the
# newest CUDA build (several GB). Without a GPU driver we pin the CPU build; with one, the user's
# pip configuration picks the CUDA build that matches their cluster.
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        "${pip[@]}" install "torch>=2.9"
    else
        "${pip[@]}" install "torch==2.13.0"
    fi
fi

# DeepSpeed (Ulysses context parallelism) is a source distribution whose build imports torch;
# without --no-build-isolation pip would build it against a freshly downloaded CUDA torch.
if ! "$venv/bin/python" -c "import deepspeed" 2>/dev/null; then
    "${pip[@]}" install --no-build-isolation "deepspeed>=0.16"
fi

stamp="$venv/.lbva-installed"
want="$(cat "$repo/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "${pip[@]}" install -e "$repo[test]"
    echo "$want" > "$stamp"
fi

#!/usr/bin/env bash
# Download the Python 3.12 manylinux x86_64 wheels bench/gpu_check.py needs that the GPU image
# (Python 3.12, torch 2.11, numpy, safetensors) lacks, into one folder that travels with the device
# tool's `carry` list. Fails when the folder passes 48 MiB (what a carry can hold beside the tree).
#
#   bash bench/gpu_wheels.sh [FOLDER]        # default .whl (git-ignored, so carry it: ["./.whl"])
#
# Pins are the versions the project's venv tests with. Each line says which part needs it.
set -euo pipefail

folder="${1:-.whl}"
limit_bytes=$((48 * 1024 * 1024))
wheels=(
  "torchao==0.18.0"          # fp8 part: parallelism/fp8.py's torchao float8 (pure Python wheel)
  "rich==15.0.0"             # step part: training/trainer.py imports rich.console at module level
  "markdown-it-py==4.3.0"    #   rich's dependencies
  "mdurl==0.1.2"
  "pygments==2.21.0"
  "websockets==17.4"         # inference part: bench/inference_latency.py imports the server/client
  "msgpack==1.2.4"           #   (the wire format of inference/protocol.py)
  "pytest==9.2.0"            # tests part: pytest -m gpu
  "iniconfig==2.3.1"         #   pytest's dependencies
  "pluggy==1.7.0"
  "packaging==26.4"
  "setuptools==84.2.1"       # pip install -e . without build isolation (no index on the device)
)

mkdir -p "$folder"
python3 -m pip download --no-deps --only-binary=:all: --dest "$folder" \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  "${wheels[@]}"

total=$(du -cb "$folder"/*.whl | tail -1 | cut -f1)
echo "gpu_wheels: $(ls "$folder"/*.whl | wc -l) wheels, $((total / 1024 / 1024)) MiB in $folder"
if (( total > limit_bytes )); then
  echo "gpu_wheels: error: $total bytes pass the 48 MiB limit; drop a wheel or carry it separately" >&2
  exit 1
fi

#!/usr/bin/env bash
# The demo command: sets up .venv, generates the procedural LeRobot dataset and trains the tiny
# model on it with the embedded default config. Extra arguments go to `lbva train`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
cd "$repo"
exec "$repo/.venv/bin/lbva" demo "$@"

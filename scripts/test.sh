#!/usr/bin/env bash
# The test command: sets up .venv (see setup_env.sh) and runs the whole suite.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
cd "$repo"
exec "$repo/.venv/bin/python" -m pytest -q "$@"

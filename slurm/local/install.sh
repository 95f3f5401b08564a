#!/usr/bin/env bash
# Installs what the local test cluster needs from Debian's packages: slurmctld, slurmd, the client
# commands (sbatch, srun, scontrol, ...) and munge. Idempotent: does nothing when all are present.
# Needs root (CI runs as root); run `sudo bash slurm/local/install.sh` elsewhere.
set -euo pipefail

missing=()
for tool in slurmctld slurmd sbatch munged; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || missing+=("$tool")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# The lists may be missing in a fresh image; update them once, not on every run.
if ! apt-cache show slurmctld >/dev/null 2>&1; then
    apt-get update -q
fi
# --no-install-recommends keeps out mail servers and documentation the test cluster never uses.
apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge

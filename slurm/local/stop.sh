#!/usr/bin/env bash
# Stops the Slurm test cluster of STATE_DIR (default /tmp/lbva-slurm): cancels its jobs, ends its
# daemons by the pids they recorded, and removes STATE_DIR. Safe to run when nothing is running.
set -euo pipefail

state="$(realpath -m "${1:-/tmp/lbva-slurm}")"
conf="$state/slurm.conf"
PATH="$PATH:/usr/sbin"

# A missing or foreign directory is left alone: only remove what start.sh made.
if [ ! -d "$state" ]; then
    exit 0
fi
if [ ! -f "$conf" ] && [ ! -d "$state/munge" ]; then
    echo "stop.sh: $state does not look like a test cluster made by start.sh; not touching it" >&2
    exit 1
fi

# Jobs first, while slurmd still runs: their slurmstepd processes outlive slurmd otherwise.
if [ -f "$conf" ] && SLURM_CONF="$conf" timeout 10 scontrol ping >/dev/null 2>&1; then
    export SLURM_CONF="$conf"
    scancel --full --quiet $(squeue -h -o %A 2>/dev/null) 2>/dev/null || true
    for _ in $(seq 1 40); do
        [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
        sleep 0.5
    done
fi

# Ends the daemons whose pid files are given, together (slurmd takes seconds to wind down), and
# waits for them; SIGKILL after 10 s.
stop_daemons() {
    local pids=() file pid
    for file in "$@"; do
        [ -f "$file" ] && pid="$(cat "$file")" && [ -n "$pid" ] && kill "$pid" 2>/dev/null && pids+=("$pid")
    done
    for _ in $(seq 1 40); do
        local alive=0
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        [ "$alive" = 0 ] && return 0
        sleep 0.25
    done
    for pid in "${pids[@]}"; do
        kill -9 "$pid" 2>/dev/null || true
    done
}

stop_daemons "$state"/slurmd.*.pid "$state/slurmctld.pid"
stop_daemons "$state/munge/munged.pid"  # last: the others talk to it while shutting down
rm -rf "$state"

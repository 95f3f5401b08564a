#!/usr/bin/env bash
# Starts a Slurm test cluster on this machine: munged, slurmctld and one slurmd per node, each
# slurmd standing in for a separate node (node1, node2; 1 CPU and 1 GPU slot each) although all
# run on localhost. Everything lives in STATE_DIR (default /tmp/lbva-slurm): config, munge key,
# sockets, state, spool and logs, so `stop.sh` removes it without a trace.
#
#   bash slurm/local/start.sh [STATE_DIR]      then: export SLURM_CONF=STATE_DIR/slurm.conf
#
# Idempotent: when the cluster of STATE_DIR answers, it is left running; a half-dead one is
# stopped and started afresh. Needs root (slurmd launches jobs as their user) and the packages of
# install.sh. The GPU slots are stand-ins (see gres.conf below): jobs may ask --gpus-per-node=1,
# which exercises the templates' GPU plumbing on a machine that has no GPU.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
state="$(realpath -m "${1:-/tmp/lbva-slurm}")"
conf="$state/slurm.conf"
nodes=(node1 node2)
# Away from Slurm's defaults (6817/6818) so a real installation on the same machine is not disturbed.
ctld_port=16817
node_ports=(16818 16819)

for tool in munged mungekey slurmctld slurmd scontrol sinfo; do
    command -v "$tool" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin"
    command -v "$tool" >/dev/null 2>&1 || { echo "start.sh: $tool not found; run slurm/local/install.sh" >&2; exit 1; }
done

cluster_answers() {
    [ -f "$conf" ] || return 1
    SLURM_CONF="$conf" timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null | grep -c -E 'idle|alloc|mix' \
        | grep -qx "${#nodes[@]}"
}

if cluster_answers; then
    echo "Slurm test cluster already running in $state"
    exit 0
fi
if [ -d "$state" ]; then
    bash "$here/stop.sh" "$state"
fi

mkdir -p "$state"/{munge,ctld,log}
chmod 700 "$state/munge"
mungekey --create --keyfile="$state/munge/munge.key" --force
chmod 600 "$state/munge/munge.key"
# --force: munged refuses to run as root or with a world-writable /tmp in its path otherwise.
munged --force --socket="$state/munge/munge.socket" --key-file="$state/munge/munge.key" \
    --pid-file="$state/munge/munged.pid" --log-file="$state/log/munged.log" --seed-file="$state/munge/seed"

{
    cat <<EOF
ClusterName=lbva-local
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long before it may start again (Slurm's default is 120 s).
AuthInfo=socket=$state/munge/munge.socket,cred_expire=5
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool/%n
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.%n.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.%n.log
# A container has no usable cgroups: track processes through /proc, bind no tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
JobRequeue=1
ReturnToService=2
# Tests drive jobs that last seconds: schedule at once, keep finished jobs visible to scontrol for
# the length of a test session, and give killed jobs little grace.
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1,sched_min_interval=100000
MinJobAge=3600
KillWait=10
MessageTimeout=20
InactiveLimit=0
SlurmdTimeout=60
EOF
    for i in "${!nodes[@]}"; do
        echo "NodeName=${nodes[$i]} NodeHostname=localhost NodeAddr=127.0.0.1 Port=${node_ports[$i]} CPUs=1 Gres=gpu:1 State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=node[1-${#nodes[@]}] Default=YES MaxTime=30 State=UP"
} > "$conf"
# /dev/null as the device file: Slurm counts the slot and sets CUDA_VISIBLE_DEVICES; no GPU is touched.
printf 'AutoDetect=off\nNodeName=node[1-%d] Name=gpu File=/dev/null\n' "${#nodes[@]}" > "$state/gres.conf"

export SLURM_CONF="$conf"
slurmctld -f "$conf"
for node in "${nodes[@]}"; do
    mkdir -p "$state/spool/$node"
    slurmd -f "$conf" -N "$node"
done

for _ in $(seq 1 60); do
    if cluster_answers; then
        echo "Slurm test cluster running in $state; export SLURM_CONF=$conf"
        exit 0
    fi
    sleep 0.5
done
echo "start.sh: the nodes did not come up in 30 s; logs in $state/log" >&2
sinfo -N >&2 || true
exit 1

# Sourced in a job's batch shell (slurm/pretrain.sbatch, the scripts `lbva launch slurm` writes):
# exports where the ranks meet.
#   MASTER_ADDR  the address at which Slurm reaches the job's first node (its NodeAddr, which
#                defaults to the node name); resolvable from every node of the job.
#   MASTER_PORT  derived from the job id, so that jobs sharing a node do not collide while a
#                requeued job (same id) gets its port back; below Linux's ephemeral range.

lbva_head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
MASTER_ADDR="$(scontrol show node "$lbva_head_node" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')"
export MASTER_ADDR="${MASTER_ADDR:-$lbva_head_node}"
export MASTER_PORT="$((20000 + SLURM_JOB_ID % 10000))"

# The environment of this project's Slurm jobs. Edit it for your cluster.
#
# Sourced by slurm/pretrain.sbatch, slurm/prepare_data.sbatch and the batch scripts that
# `lbva launch slurm` writes, in the batch shell on the job's first node before any srun; srun
# passes the exported variables on to every task. Keep it quiet and safe to source twice.

lbva_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# ---- Software ----------------------------------------------------------------------------------
# module purge
# module load cuda/12.4 nccl

# Container: the command every srun task of the sbatch templates runs under; empty runs on the
# host. The repository, the data and the output directory must be visible inside (bind mounts).
# (`lbva launch slurm` runs its tasks with the Python that submitted them; submit from inside the
# container for it.)
LBVA_CONTAINER=()
# LBVA_CONTAINER=(apptainer exec --nv --bind /lustre /lustre/images/lbva.sif)

# Python: the repository's virtual environment (scripts/setup_env.sh makes it), unless a container
# brings its own.
if [ ${#LBVA_CONTAINER[@]} -eq 0 ] && [ -f "$lbva_repo/.venv/bin/activate" ]; then
    # shellcheck disable=SC1091
    source "$lbva_repo/.venv/bin/activate"
fi

# ---- Paths -------------------------------------------------------------------------------------
# Data and output folders are set in the run's config (data.prepared, run.output_dir); put them
# on a filesystem every node sees. Caches and scratch:
# export HF_HOME=/lustre/$USER/hf-cache          # VAE and text-encoder weights for data preparation
# export WANDB_DIR=/lustre/$USER/wandb           # run.wandb=offline writes here; sync later
# export TMPDIR=/local/scratch/$USER             # node-local scratch

# ---- PyTorch distributed and NCCL ---------------------------------------------------------------
# A rank that dies or a collective that hangs should end the job (which then requeues, or the next
# chained job resumes) rather than hold the nodes until the time limit: 1 aborts the communicators
# and ends the process on a collective error or timeout. torchrun sets 1 for its workers when this
# is unset; the ranks of `lbva launch slurm` run without torchrun and need it here.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# On a collective timeout, dump the flight recorder (the last collectives of each rank) to find
# the rank that fell behind:
# export TORCH_NCCL_TRACE_BUFFER_SIZE=2000 TORCH_NCCL_DUMP_ON_TIMEOUT=1
# export NCCL_DEBUG=WARN                         # INFO prints the chosen transports and rings

# Network interfaces. NCCL_SOCKET_IFNAME is the interface for NCCL's bootstrap and socket
# transport (and GLOO_SOCKET_IFNAME for gloo): name it when nodes have several (e.g. eth0 and a
# docker bridge), or exclude with a caret: ^lo,docker0.
# export NCCL_SOCKET_IFNAME=eth0
# export GLOO_SOCKET_IFNAME=eth0
# InfiniBand / RoCE: which HCAs (ibv_devices lists them), the GID index RoCE needs, a longer
# retransmission timeout on large fabrics; NCCL_IB_DISABLE=1 forces TCP sockets.
# export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3
# export NCCL_IB_GID_INDEX=3
# export NCCL_IB_TIMEOUT=22
# export NCCL_IB_DISABLE=1

# CPU threads per rank (torchrun sets 1 when unset): data decoding and the optimizer step on CPU.
# export OMP_NUM_THREADS=8

"""Slurm: `lbva launch slurm` (submitit jobs that survive time limits, preemption and crashes) and
the requeue of jobs started from slurm/pretrain.sbatch.

`lbva launch slurm`: each job has one task per node, started by submitit with srun; the task runs
the node's torchrun agent (`TrainingJob`), which starts one rank per GPU (one per node without
GPUs) and restarts the group inside the job when a rank fails (`--max-restarts`), as
slurm/pretrain.sbatch does. The batch script exports MASTER_ADDR/MASTER_PORT (slurm/rendezvous.sh),
the agents' rendezvous, after sourcing slurm/env.sh, the environment file users edit.

Time limits: a job asks Slurm for SIGUSR2 some seconds before its limit, and the ranks stop at the
next step boundary with a checkpoint (signals.StopFlag). Who requeues then:
- submitit jobs: submitit installs a USR2 handler in every task before calling `TrainingJob`,
  which puts a StopFlag in that handler's place while its agent runs (the ranks get the signal
  from Slurm directly and run with `--no-requeue`). After the stop, task 0 hands the signal back to
  submitit's handler, which takes submitit's own requeue path: it calls `checkpoint()` (inherited
  from `Checkpointable`: this same callable again, the training state being on disk already),
  stores that as the job's pickle, runs `scontrol requeue` and exits. submitit counts these
  requeues against `max_requeues`.
- sbatch jobs (torchrun workers, `lbva train`): rank 0 runs `scontrol requeue` itself
  (`requeue_after_time_limit`). Rank 0 knows what the batch shell does not: whether the run
  stopped early or had just finished, so a finished run is never requeued.
The requeued job starts again under the same id and resumes from the checkpoint.

SIGTERM (scancel, preemption, `scontrol requeue` by someone else) also stops the run at the next
step boundary with a checkpoint, but requeues nothing: Slurm already decided whether the job comes
back (it requeues preempted and requeued jobs itself, and a cancelled job stays cancelled).

`chain` > 1 submits further jobs, each starting after the previous one ended in any state
(`--dependency=afterany`): they continue the run after a crash or a refused requeue, and return at
once when they find the run finished.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import submitit
from submitit.core.utils import FailedJobError

from lbva.training.config import TrainConfig
from lbva.errors import UserError

from .local import DEFAULT_MAX_RESTARTS, WorkerOutcome, newest_committed_step, run_dir_of
from .preflight import check_before_launch
from .signals import StopFlag, StopReason

SLURM_DIR = Path(__file__).resolve().parent.parent / "slurm"
# Slurm keeps the lead time of --signal in 16 bits.
MAX_SIGNAL_SECONDS = 65535


@dataclass
class SlurmResources:
    nodes: int
    gpus_per_node: int  # 0: CPU nodes, one rank per node
    time_minutes: int
    partition: str | None = None
    signal_before_s: int = 300  # must cover one step plus one checkpoint
    max_requeues: int = 100  # time-limit requeues submitit allows before it lets the job end
    sbatch: dict[str, str] = field(default_factory=dict)  # further sbatch options: account, qos, ...

    @property
    def ranks_per_node(self) -> int:
        return max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    def validate(self) -> None:
        if self.nodes < 1:
            raise UserError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise UserError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        if not 0 < self.signal_before_s <= MAX_SIGNAL_SECONDS:
            raise UserError(f"--signal-before must lie in 1..{MAX_SIGNAL_SECONDS} seconds, got {self.signal_before_s}")
        if self.signal_before_s >= self.time_minutes * 60:
            raise UserError(
                f"--signal-before ({self.signal_before_s} s) must be shorter than --time ({self.time_minutes} min): "
                "the job needs time to train before it is told to stop"
            )
        if self.max_requeues < 0:
            raise UserError(f"--max-requeues must be >= 0, got {self.max_requeues}")


def parse_time(text: str) -> int:
    """Minutes, rounded up, of a Slurm time: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if match is None:
        raise UserError(f"--time: '{text}' is not a Slurm time (M, M:S, H:M:S, D-H, D-H:M or D-H:M:S)")
    days, first, second, third = (int(part) if part is not None else None for part in match.groups())
    if days is not None:
        seconds = days * 86400 + first * 3600 + (second or 0) * 60 + (third or 0)
    elif third is not None:
        seconds = first * 3600 + second * 60 + third
    elif second is not None:
        seconds = first * 60 + second
    else:
        seconds = first * 60
    if seconds <= 0:
        raise UserError(f"--time must be positive, got '{text}'")
    return math.ceil(seconds / 60)


def parse_sbatch_options(items: list[str]) -> dict[str, str]:
    """`KEY=VALUE` items (sbatch's long option names without dashes) as a dict."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--sbatch expects KEY=VALUE (an sbatch long option, e.g. account=abc), got '{item}'")
        options[key.lstrip("-")] = value
    return options


class TrainingJob(submitit.helpers.Checkpointable):
    """What each task of a `launch slurm` job runs: one node's torchrun agent, which starts the
    node's ranks (`lbva train` as in slurm/pretrain.sbatch) and restarts the whole group, inside the
    job, up to `max_restarts` times when a rank fails; each restart resumes from the newest
    committed checkpoint.

    Signals: Slurm's USR2 (the time limit) and TERM reach every process of the job step, the ranks
    included, which stop at a step boundary with a checkpoint. The agent ignores both (it must
    outlive its ranks' checkpoint); this task records them in place of submitit's handler while the
    agent runs. After a time-limit stop of an unfinished run, task 0 hands USR2 to submitit's
    handler, which requeues the job (counted against --max-requeues). The inherited
    `checkpoint()` returns this same callable: requeued, it starts over and the ranks resume.
    """

    def __init__(self, config_file: Path | None, overrides: list[str], run_dir: Path, total_steps: int,
                 ranks_per_node: int, max_restarts: int) -> None:
        self.config_file = config_file
        self.overrides = list(overrides)
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.ranks_per_node = ranks_per_node
        self.max_restarts = max_restarts

    def command(self, nodes: int, job_id: str) -> list[str]:
        """The torchrun agent of one node of the job."""
        config_args = [f"--config={self.config_file}"] if self.config_file is not None else []
        return [
            sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}",
            f"--nproc-per-node={self.ranks_per_node}", f"--max-restarts={self.max_restarts}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
            f"--rdzv-id={job_id}", "-m", "lbva.launchers.cli", "train", "--no-requeue", *config_args, *self.overrides,
        ]

    def __call__(self) -> int:
        task = submitit.JobEnvironment()
        with StopFlag() as stop:
            agent = subprocess.Popen(self.command(task.num_nodes, task.job_id), env=_agent_environment(),
                                     preexec_fn=_agent_ignores_stop_signals)
            status = _wait(agent)
        # submitit's own handlers are back from here on.
        if status != 0:
            raise RuntimeError(f"the ranks of node {task.node} failed (torchrun exit status {status}) after "
                               f"up to {self.max_restarts} group restarts; see this log")
        if newest_committed_step(self.run_dir) >= self.total_steps:
            return 0
        if stop.received is StopReason.TIME_LIMIT and task.global_rank == 0:
            # submitit's handler checkpoints this callable, requeues the job and exits.
            signal.raise_signal(signal.SIGUSR2)
        # Stopped early: leave without a result, which submitit would read as the job's outcome;
        # the job comes back (requeued) or was cancelled.
        raise SystemExit(0)


def _agent_environment() -> dict[str, str]:
    """torchrun handles neither USR2 nor TERM (the ranks do; see TrainingJob), and one node's
    restart must not wait on a rendezvous store hosted by another node's agent (torch shares the
    store of the first agent by default, keyed on a restart count only the failed node raises)."""
    return {**os.environ, "PET_SIGNALS_TO_HANDLE": "SIGINT,SIGHUP,SIGQUIT",
            "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGINT,SIGHUP,SIGQUIT", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def _agent_ignores_stop_signals() -> None:
    for signum in (signal.SIGUSR2, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def _wait(process: subprocess.Popen) -> int:
    """The exit status of `process`; a signal recorded meanwhile does not interrupt the wait."""
    while True:
        try:
            return process.wait()
        except InterruptedError:
            continue


def current_job_id() -> str | None:
    """The id `scontrol` knows this job by (array tasks: ARRAYJOB_TASK); None outside Slurm."""
    if "SLURM_ARRAY_JOB_ID" in os.environ and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_after_time_limit(outcome: WorkerOutcome) -> None:
    """The requeue of the sbatch path: rank 0 of a Slurm job whose run stopped early on the
    time-limit signal asks Slurm to requeue the job; the other ranks, and runs that finished or
    stopped on SIGTERM (Slurm's decision), do nothing. Slurm then ends the job (SIGTERM to every
    process) and starts it again under the same id; the next start resumes from the checkpoint
    just written. A refused requeue leaves the run stopped and saved, with a message saying so."""
    if outcome.finished or outcome.stop_reason is not StopReason.TIME_LIMIT or os.environ.get("RANK", "0") != "0":
        return
    job_id = current_job_id()
    if job_id is None:
        print("not a Slurm job: nothing to requeue; run the same command again to continue")
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        print(f"could not requeue job {job_id} ({error}); submit the same job again to continue")
        return
    if result.returncode != 0:
        print(f"could not requeue job {job_id}: {result.stderr.strip()}; submit the same job again to continue")
        return
    print(f"requeued job {job_id}: it resumes from step {outcome.steps}")


def submit(config: TrainConfig, config_file: Path | None, overrides: list[str], resources: SlurmResources,
           chain: int = 1, max_restarts: int = DEFAULT_MAX_RESTARTS) -> tuple[list[str], Path]:
    """Submit the run of `config` (what `config_file` and `overrides` load to; each rank loads them
    again) as `chain` jobs, each after the previous one ended; returns the job ids and the folder of
    submitit's logs (run_dir/slurm). A run whose layout does not fit `resources`, or that has no
    data, is refused before anything is submitted."""
    resources.validate()
    if chain < 1:
        raise UserError(f"--chain must be >= 1, got {chain}")
    if max_restarts < 0:
        raise UserError(f"--max-restarts must be >= 0, got {max_restarts}")
    check_before_launch(config, resources.world_size, f"{resources.nodes} node(s) x {resources.ranks_per_node} "
                                                      f"rank(s) = {resources.world_size} ranks")
    folder = run_dir_of(config) / "slurm"
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=resources.max_requeues)
    except RuntimeError as error:  # submitit's way of saying there is no srun here
        raise UserError(f"launch slurm: {error}") from error
    executor.update_parameters(
        name=f"lbva-{config.run.name}",
        nodes=resources.nodes,
        tasks_per_node=1,  # the node's torchrun agent, which starts its ranks
        gpus_per_node=resources.gpus_per_node or None,
        timeout_min=resources.time_minutes,
        slurm_partition=resources.partition,
        slurm_signal_delay_s=resources.signal_before_s,
        slurm_setup=[
            f"source {SLURM_DIR / 'env.sh'}",
            f"source {SLURM_DIR / 'rendezvous.sh'}",
            # srun does not take --cpus-per-task from sbatch (Slurm 22.05 on); this variable does.
            '[ -z "${SLURM_CPUS_PER_TASK:-}" ] || export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"',
        ],
        # A node whose agent gave up must end the step; the others would wait in a rendezvous.
        slurm_srun_args=["--kill-on-bad-exit=1"],
        slurm_additional_parameters={"requeue": True, **resources.sbatch},
    )
    job_ids: list[str] = []
    for _ in range(chain):
        if job_ids:
            executor.update_parameters(slurm_dependency=f"afterany:{job_ids[-1]}")
        try:
            job = TrainingJob(config_file.resolve() if config_file is not None else None, overrides,
                              run_dir_of(config).resolve(), config.run.steps, resources.ranks_per_node, max_restarts)
            job_ids.append(executor.submit(job).job_id)
        except FailedJobError as error:
            lines = [line for line in str(error).splitlines() if line.strip()]
            raise UserError(f"sbatch refused the job: {lines[-1] if lines else error}") from error
    return job_ids, folder

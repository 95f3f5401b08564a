"""Training on this machine: the worker every rank runs, and `lbva launch local`.

Every way of launching ends in `run_worker`, once per rank: `lbva train` is it, and `lbva launch
local` and slurm/pretrain.sbatch start the ranks with torchrun as `python -m lbva.launchers.cli train
...`; `lbva launch slurm` calls it from its submitit task. `run_worker` makes any start of a job the
continuation of its run: a run directory with a committed checkpoint resumes from the newest one
(`checkpoint.resume` only decides how a fresh run begins: from scratch, or from the weights of an
imported checkpoint), and a run already at its last step is not trained again, which is what a
chained or requeued job finds when the run ended during the job before it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from lbva.checkpoints_tools.manager import CheckpointError, committed_steps, step_dir, verify
from lbva.training.config import TrainConfig
from lbva.training.distributed import world_from_env
from lbva.errors import UserError
from lbva.quiet import configure_output, mute_library_loggers

from .preflight import check_before_launch
from .signals import StopFlag, StopReason


@dataclass
class WorkerOutcome:
    run_dir: Path
    steps: int  # the last step reached
    total_steps: int  # config.run.steps
    stop_reason: StopReason  # NONE unless a signal ended the run early

    @property
    def finished(self) -> bool:
        return self.steps >= self.total_steps


def run_dir_of(config: TrainConfig) -> Path:
    return config.run.output_dir / config.run.name


def newest_committed_step(run_dir: Path) -> int:
    steps = committed_steps(run_dir / "checkpoints")
    return steps[-1] if steps else 0


def _looks_sound(folder: Path) -> bool:
    """Presence and sizes only (every rank decides alike without reading the whole checkpoint): a
    run whose last checkpoint is damaged trains on, and resume=auto falls back past it, verifying
    checksums as it loads."""
    try:
        return not verify(folder, checksums=False)
    except CheckpointError:
        return False


def run_worker(config: TrainConfig, stop: StopFlag, console: Console | None = None) -> WorkerOutcome:
    """Train one rank of `config`'s run until its last step or until `stop` says so.

    Resumes from the run's newest committed checkpoint when there is one and returns at once when
    that checkpoint is the last step. `stop` must be installed already (its handlers in place).
    """
    # One voice per run: the other ranks decide the same and stay quiet, as the trainer's do.
    console = console or Console(quiet=world_from_env().rank != 0)
    run_dir = run_dir_of(config)
    start_step = newest_committed_step(run_dir)
    if start_step >= config.run.steps and _looks_sound(step_dir(run_dir / "checkpoints", start_step)):
        console.print(f"{run_dir}: already at step {start_step} of {config.run.steps}; nothing to train",
                      soft_wrap=True)
        return WorkerOutcome(run_dir, start_step, config.run.steps, StopReason.NONE)
    if start_step > 0:
        config = dataclasses.replace(config, checkpoint=dataclasses.replace(config.checkpoint, resume="auto"))

    from lbva.training.trainer import train  # heavy (the model, the data); after the cheap checks

    result = train(config, console, stop=stop)
    outcome = WorkerOutcome(run_dir, result.steps, config.run.steps, stop.reason)
    if not outcome.finished:
        console.print(
            f"stopped at step {outcome.steps} of {outcome.total_steps} on {_STOP_REASONS[outcome.stop_reason]}; "
            "the checkpoint of that step is committed and the next start resumes from it",
            soft_wrap=True,  # one line in the job log, where the console is not a terminal
        )
    return outcome


_STOP_REASONS = {
    StopReason.TIME_LIMIT: "SIGUSR2 (the time limit is near)",
    StopReason.TERMINATE: "SIGTERM (the job is being ended: cancelled, preempted or requeued)",
}


# Names the file where a worker of `lbva launch local` records a user mistake (agent_main).
USER_ERROR_FILE = "LBVA_USER_ERROR_FILE"


# Group restarts torchrun makes inside one launch before it gives up (`lbva launch local
# --max-restarts`; slurm/pretrain.sbatch has the same default).
DEFAULT_MAX_RESTARTS = 3


def default_nproc() -> int:
    """One rank per visible GPU; one rank on a machine without."""
    import torch

    return max(torch.cuda.device_count(), 1)


def launch_local(
    config: TrainConfig, config_file: Path | None, overrides: list[str], nproc: int,
    max_restarts: int = DEFAULT_MAX_RESTARTS, verbose: bool = False,
) -> None:
    """Become torchrun's agent (`torch.distributed.run --standalone`) running `nproc` workers of the
    run on this machine.

    `config` is what `config_file` and `overrides` load to; it is checked against `nproc` ranks
    before torchrun starts, and each worker loads it again from the same file and overrides.
    A worker that fails (a crash, a kill -9, an OOM) makes torchrun stop the others and start the
    whole group again, up to `max_restarts` times; the new workers resume from the run's newest
    committed checkpoint (`run_worker`), so what a restart costs is the steps since that checkpoint.
    The process is replaced (exec), not wrapped: Ctrl-C and SIGTERM then reach the agent, which
    passes them to the workers, instead of a parent that would kill it and orphan them. The agent
    runs in `agent_main`, which makes a SIGTERM that the workers checkpointed a clean exit.
    """
    if nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {nproc}")
    if max_restarts < 0:
        raise UserError(f"--max-restarts must be >= 0, got {max_restarts}")
    check_before_launch(config, nproc, f"{nproc} rank(s) on this machine")
    config_args = [f"--config={config_file}"] if config_file is not None else []
    verbose_args = ["--verbose"] if verbose else []
    command = [
        sys.executable, "-m", "lbva.launchers.local", *verbose_args, str(run_dir_of(config)),
        "--standalone", "--nnodes=1", f"--max-restarts={max_restarts}", f"--nproc-per-node={nproc}",
        "-m", "lbva.launchers.cli", *verbose_args, "train", *config_args, *overrides,
    ]
    sys.stdout.flush()
    # torchrun's default SIGUSR2 action would end it and its workers without a checkpoint; ignored
    # here, USR2 stays ignored through exec in the agent, and each worker installs its StopFlag.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    os.execv(command[0], command)


def agent_main(run_dir: Path, torchrun_args: list[str], verbose: bool = False) -> int:
    """torchrun's agent in this process -> the exit status of `lbva launch local`.

    A user mistake that only a worker can see (a bad weights folder, data that fails mid-run) is
    not worth a restart: the worker records its one line in the file USER_ERROR_FILE names, every
    restarted worker then exits 2 at once, and the launch ends with that line and status 2 instead
    of torchrun's failure report.

    On SIGTERM torchrun's agent passes the signal to the workers, which checkpoint at their next
    step boundary and say so in one line (`run_worker`), waits for them, and then raises: as a
    command, torchrun would print a traceback and exit 1 for a stop that went as planned. Here that
    stop exits 0 when the run holds a checkpoint to resume from; otherwise 128 + the signal, as
    for any other signal (SIGINT, SIGHUP: no checkpoint is promised for those).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    if not verbose:  # torchrun's notices (OMP_NUM_THREADS, "shutting down workers") stay off stderr
        mute_library_loggers()
    handle, user_error = tempfile.mkstemp(prefix="lbva-user-error-")
    os.close(handle)
    os.environ[USER_ERROR_FILE] = user_error
    # A worker's exit 2 after it recorded a user mistake is that mistake, said once at the end.
    recorded = lambda: os.path.getsize(user_error) > 0  # noqa: E731
    quiet_user_errors = logging.Filter()
    quiet_user_errors.filter = lambda record: not (record.levelno >= logging.ERROR and recorded())
    logging.getLogger("torch.distributed.elastic").addFilter(quiet_user_errors)
    for name in logging.root.manager.loggerDict:
        if name.startswith("torch.distributed.elastic."):
            logging.getLogger(name).addFilter(quiet_user_errors)
    try:
        torchrun(torchrun_args)
    except ChildFailedError:
        messages = Path(user_error).read_text().splitlines()
        if not messages:
            raise
        print(f"lbva: error: {messages[0]}", file=sys.stderr)  # each rank wrote it; once is enough
        return 2
    except SignalException as stop:
        step = newest_committed_step(run_dir)
        if stop.sigval == signal.SIGTERM and step > 0:
            return 0
        resume = f"the next launch resumes from step {step}" if step else "no checkpoint was committed yet"
        print(f"lbva launch local: stopped by {signal.Signals(stop.sigval).name}; {resume} ({run_dir})",
              file=sys.stderr)
        return 128 + int(stop.sigval)
    finally:
        Path(user_error).unlink(missing_ok=True)
    return 0


def _agent_command_line(argv: list[str]) -> int:
    """`python -m lbva.launchers.local [--verbose] RUN_DIR TORCHRUN_ARGS...`, what `launch_local` execs."""
    verbose = argv[:1] == ["--verbose"]
    if verbose:
        argv = argv[1:]
    configure_output(verbose)
    return agent_main(Path(argv[0]), argv[1:], verbose)


if __name__ == "__main__":
    sys.exit(_agent_command_line(sys.argv[1:]))

"""`lbva launch`: start a run on a Slurm cluster (`slurm`), on this machine (`local`), or run one
rank of a run under torchrun (`worker`: what `local` and slurm/pretrain.sbatch start per rank).

`register` adds the commands to the `lbva` CLI. `python -m lbva.launchers.cli COMMAND ...` runs
the same commands without the console script: torchrun starts workers by module name, so a job
needs no `lbva` on its PATH.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lbva.errors import UserError


def _load_config(args: argparse.Namespace, check_data: bool = False):
    from lbva.training.config import TrainConfig
    from lbva.training.config_io import load_config
    from lbva.training.data_source import check_data_config

    config = load_config(TrainConfig, args.config, args.overrides)
    if check_data:  # before a job waits in the queue, or torchrun starts workers, for nothing
        check_data_config(config)
    return config


def _cmd_slurm(args: argparse.Namespace) -> None:
    from .slurm import SlurmResources, parse_sbatch_options, parse_time, submit  # imports submitit

    resources = SlurmResources(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, time_minutes=parse_time(args.time),
        partition=args.partition, signal_before_s=args.signal_before, max_requeues=args.max_requeues,
        sbatch=parse_sbatch_options(args.sbatch),
    )
    config = _load_config(args, check_data=True)
    job_ids, folder = submit(config, resources, chain=args.chain)
    chained = " (chained: each starts after the previous one ends)" if len(job_ids) > 1 else ""
    print(f"submitted job {', '.join(job_ids)}{chained} for run {folder.parent}")
    print(f"logs: {folder}/<job id>_<task>_log.out; watch: squeue -j {','.join(job_ids)}")


def _cmd_local(args: argparse.Namespace) -> None:
    from .local import default_nproc, launch_local

    _load_config(args, check_data=True)  # a bad config ends here, in one line, not in every worker
    launch_local(args.config, args.overrides, args.nproc or default_nproc())


def _cmd_worker(args: argparse.Namespace) -> None:
    from .local import run_worker
    from .signals import StopFlag, ignore_stop_signals
    from .slurm import requeue_after_time_limit

    # Handlers first: a signal that arrives while the model is built must still stop the run at
    # its first step boundary.
    stop = StopFlag().install()
    outcome = run_worker(_load_config(args), stop)
    ignore_stop_signals()
    requeue_after_time_limit(outcome)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="TOML config file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. run.steps=100")


def _add_commands(commands: argparse._SubParsersAction) -> None:
    slurm = commands.add_parser(
        "slurm", help="submit the run as Slurm jobs (submitit) that checkpoint and requeue at the time limit",
        description="Submit the run to Slurm through submitit: one task per GPU, SIGUSR2 before the time limit "
                    "(checkpoint, requeue, resume), auto-resume from the newest checkpoint on every start.",
    )
    _add_config_arguments(slurm)
    slurm.add_argument("--nodes", type=int, required=True)
    slurm.add_argument("--gpus-per-node", type=int, required=True, help="0 for CPU nodes (one rank per node)")
    slurm.add_argument("--time", required=True, help="time limit of each job, as sbatch takes it: 240, 4:00:00, 1-0")
    slurm.add_argument("--partition", default=None, help="default: the cluster's default partition")
    slurm.add_argument("--chain", type=int, default=1, metavar="K",
                       help="submit K jobs, each after the previous one ends (afterany): continues after crashes")
    slurm.add_argument("--signal-before", type=int, default=300, metavar="SECONDS",
                       help="send SIGUSR2 this long before the time limit; must cover one step and one checkpoint")
    slurm.add_argument("--max-requeues", type=int, default=100, help="time-limit requeues allowed per job")
    slurm.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                       help="further sbatch option, repeatable: --sbatch account=abc --sbatch qos=high")
    slurm.set_defaults(func=_cmd_slurm)

    local = commands.add_parser("local", help="run on this machine with torchrun --standalone")
    _add_config_arguments(local)
    local.add_argument("--nproc", type=int, default=None, help="ranks to start (default: one per GPU, 1 without)")
    local.set_defaults(func=_cmd_local)

    worker = commands.add_parser(
        "worker", help="one rank of a run (under torchrun): resume, train, stop at a step boundary on SIGUSR2/SIGTERM",
    )
    _add_config_arguments(worker)
    worker.set_defaults(func=_cmd_worker)


def register(subparsers: argparse._SubParsersAction, parser_class: type[argparse.ArgumentParser]) -> None:
    """Add `launch {slurm,local,worker}` to the `lbva` subcommands."""
    launch = subparsers.add_parser("launch", help="start a run on Slurm or on this machine")
    commands = launch.add_subparsers(dest="launch_command", required=True, parser_class=parser_class)
    _add_commands(commands)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as the lbva CLI does
        raise UserError(f"{self.prog}: {message}")


def main(argv: list[str] | None = None) -> int:
    """`python -m lbva.launchers.cli {slurm,local,worker} ...`; exit status 2 for user errors."""
    parser = _Parser(prog="lbva launch", description="Start a run on Slurm or on this machine, or one rank of it.")
    _add_commands(parser.add_subparsers(dest="launch_command", required=True, parser_class=_Parser))
    try:
        args = parser.parse_args(argv)
        args.func(args)
    except UserError as error:
        print(f"lbva: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

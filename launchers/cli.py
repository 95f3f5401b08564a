"""The root `lbva` command. Each package adds its own subcommands through a `register` function;
this module, above them all, is the only one that imports them, and adds the launchers' own:

    `lbva train`    one rank of a run: resume from the run's newest checkpoint, train, stop at a
                    step boundary on SIGUSR2/SIGTERM (checkpointed), requeue a Slurm job stopped by
                    its time limit. Alone it is a one-process run; torchrun starts it per rank.
    `lbva launch`   start a run on a Slurm cluster (`slurm`) or on this machine (`local`), after
                    checking its layout against the allocation.

`python -m lbva.launchers.cli COMMAND ...` is the same command without the console script:
`lbva launch local` and slurm/pretrain.sbatch start `python -m lbva.launchers.cli train` under
torchrun, so a job needs no `lbva` on its PATH. User mistakes (UserError) end as one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lbva.checkpoints_tools import cli as checkpoints_cli
from lbva.errors import UserError
from lbva.evaluation import cli as evaluation_cli
from lbva.inference import cli as inference_cli
from lbva.parallelism import plan_cli
from lbva.training import cli as training_cli
from lbva.training.data import cli as data_cli

from .local import DEFAULT_MAX_RESTARTS, USER_ERROR_FILE


class CommandParser(argparse.ArgumentParser):
    """The parser of every `lbva` (sub)command: subparsers take the class of their parent, so
    every level reports a usage mistake as one line."""

    def error(self, message: str):  # one line, not usage + error
        raise UserError(f"{self.prog}: {message}")


def _load_config(args: argparse.Namespace):
    from lbva.training.config import TrainConfig
    from lbva.training.config_io import load_config

    return load_config(TrainConfig, args.config, args.overrides)


def _load_recipe(path: Path, overrides: list[str]) -> plan_cli.Recipe:
    """What `lbva plan --config` plans from a training config."""
    from lbva.training.cli import sequence_mix
    from lbva.training.config import TrainConfig
    from lbva.training.config_io import load_config

    config = load_config(TrainConfig, path, overrides)
    return plan_cli.Recipe(name=path.name, preset=config.model.preset, parallel=config.parallel,
                       mix=sequence_mix(config), steps=config.run.steps,
                       attention="sdpa" if config.model.attention == "sdpa" else "flex",
                       ema=config.optim.ema_decay > 0, model=config.model.model_config())


def _cmd_train(args: argparse.Namespace) -> None:
    from lbva.training.distributed import world_from_env

    from .local import run_worker
    from .signals import StopFlag, ignore_stop_signals
    from .slurm import requeue_after_time_limit

    # Handlers first: a signal that arrives while the model is built must still stop the run at
    # its first step boundary.
    stop = StopFlag().install()
    config = _load_config(args)
    if world_from_env().world_size == 1:
        _check_one_process(config, args)
    outcome = run_worker(config, stop)
    ignore_stop_signals()
    if not args.no_requeue:
        requeue_after_time_limit(outcome)
    if outcome.finished and world_from_env().rank == 0:
        print(f"run finished: {outcome.run_dir} ({outcome.steps} steps)")


def _check_one_process(config, args: argparse.Namespace) -> None:
    """A one-process `lbva train` of a config laid out over several processes: a UserError that
    spells out the two commands that do run it, instead of the layout's world-size mismatch."""
    from lbva.parallelism.mesh import MESH_DIMS
    from lbva.training.demo import world_size_of

    nproc = world_size_of(config)
    if nproc == 1:
        return
    wide = {name: getattr(config.parallel, name) for name in MESH_DIMS if getattr(config.parallel, name) > 1}
    config_args = [f"--config {args.config}"] if args.config is not None else []
    same = " ".join([*config_args, *args.overrides])
    one_process = " ".join(f"parallel.{name}=1" for name in wide)
    layout = ", ".join(f"parallel.{name}={size}" for name, size in wide.items())
    raise UserError(f"train: the config lays the run out over {nproc} processes ({layout}) but this is one process; "
                    f"run `lbva launch local --nproc {nproc} {same}`, or train in one process with "
                    f"`lbva train {same} {one_process}`")


def _cmd_slurm(args: argparse.Namespace) -> None:
    from .slurm import SlurmResources, parse_sbatch_options, parse_time, submit  # imports submitit

    resources = SlurmResources(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, time_minutes=parse_time(args.time),
        partition=args.partition, signal_before_s=args.signal_before, max_requeues=args.max_requeues,
        sbatch=parse_sbatch_options(args.sbatch),
    )
    job_ids, folder = submit(_load_config(args), args.config, args.overrides, resources, chain=args.chain,
                             max_restarts=args.max_restarts)
    chained = " (chained: each starts after the previous one ends)" if len(job_ids) > 1 else ""
    print(f"submitted job {', '.join(job_ids)}{chained} for run {folder.parent}")
    print(f"logs: {folder}/<job id>_<task>_log.out; watch: squeue -j {','.join(job_ids)}")


def _cmd_local(args: argparse.Namespace) -> None:
    from .local import default_nproc, launch_local

    config = _load_config(args)  # a bad config ends here, in one line, not in every worker
    nproc = default_nproc() if args.nproc is None else args.nproc
    launch_local(config, args.config, args.overrides, nproc, args.max_restarts, getattr(args, "verbose", False))


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="TOML config file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. run.steps=100")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `train` and `launch {slurm,local}` to the `lbva` subcommands."""
    train = subparsers.add_parser(
        "train", help="train from a TOML config plus KEY=VALUE overrides (one rank under torchrun): resumes the "
                      "run's newest checkpoint, stops at a step boundary with a checkpoint on SIGUSR2/SIGTERM",
    )
    _add_config_arguments(train)
    train.add_argument("--no-requeue", action="store_true",
                       help="leave the time-limit requeue to the launcher (what `lbva launch slurm` runs)")
    train.set_defaults(func=_cmd_train)

    launch = subparsers.add_parser("launch", help="start a run on Slurm or on this machine")
    commands = launch.add_subparsers(dest="launch_command", required=True)
    slurm = commands.add_parser(
        "slurm", help="submit the run as Slurm jobs (submitit) that checkpoint and requeue at the time limit",
        description="Submit the run to Slurm through submitit: one torchrun agent per node starting one rank per "
                    "GPU and restarting the group inside the job when a rank fails, SIGUSR2 before the time limit "
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
    slurm.add_argument("--max-restarts", type=int, default=DEFAULT_MAX_RESTARTS, metavar="N",
                       help="restarts of the whole group inside a job after a rank fails, each resuming from the "
                            f"newest checkpoint (default {DEFAULT_MAX_RESTARTS})")
    slurm.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                       help="further sbatch option, repeatable: --sbatch account=abc --sbatch qos=high")
    slurm.set_defaults(func=_cmd_slurm)

    local = commands.add_parser("local", help="run on this machine with torchrun --standalone")
    _add_config_arguments(local)
    local.add_argument("--nproc", type=int, default=None, help="ranks to start (default: one per GPU, 1 without)")
    local.add_argument("--max-restarts", type=int, default=DEFAULT_MAX_RESTARTS, metavar="N",
                       help="restarts of the whole group after a worker fails, each resuming from the newest "
                            f"checkpoint (default {DEFAULT_MAX_RESTARTS})")
    local.set_defaults(func=_cmd_local)


def build_parser() -> argparse.ArgumentParser:
    """The whole `lbva` command: every package's subcommands under one parser."""
    parser = CommandParser(prog="lbva", description="Pretraining of LingBot-VA video-action world models.")
    commands = parser.add_subparsers(dest="command", required=True)
    register(commands)  # train, launch
    training_cli.register(commands)  # model-info
    evaluation_cli.register(commands)  # eval, demo
    data_cli.register(commands)  # data prepare, data demo
    plan_cli.register(commands, load_recipe=_load_recipe)  # plan
    # `export` gathers what two packages write from a checkpoint; neither imports the other.
    export_kinds = commands.add_parser("export", help="export a checkpoint").add_subparsers(
        dest="export_kind", required=True)
    checkpoints_cli.register_export(export_kinds)  # export post-training
    inference_cli.register_export(export_kinds)  # export inference
    checkpoints_cli.register(commands)  # import, ckpt
    inference_cli.register(commands)  # serve
    return parser


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    """`--verbose` on every (sub)command, so it works wherever it is typed (`lbva data prepare ...
    --verbose`); SUPPRESS keeps a subcommand's default from overwriting a `--verbose` given before it."""
    parser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show lbva's INFO lines and the libraries' own warnings and loading bars")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in {id(p): p for p in action.choices.values()}.values():  # aliases: once
                _add_verbose(subparser)


def main(argv: list[str] | None = None, *, configure_output: bool = False) -> int:
    """Run `lbva ARGV`; returns the exit status (2 for a user mistake, printed as one line).

    `configure_output` (the console script and `python -m`): set this process's logging up, quiet
    unless --verbose (lbva/quiet.py); off for callers that keep their own logging, such as tests.
    """
    recorded = os.environ.get(USER_ERROR_FILE)
    if recorded and Path(recorded).is_file() and Path(recorded).stat().st_size:
        return 2  # a restart of a group that stopped on a user mistake (launchers/local.py agent_main)
    try:
        parser = build_parser()
        _add_verbose(parser)
        args = parser.parse_args(argv)
        if configure_output:
            from lbva.quiet import configure_output as configure

            configure(getattr(args, "verbose", False))
        args.func(args)
    except UserError as error:
        if recorded:
            with open(recorded, "a") as record:  # the agent prints it once, for every rank
                record.write(f"{error}\n")
            return 2
        print(f"lbva: error: {error}", file=sys.stderr)
        return 2
    return 0


def entry_point() -> None:
    sys.exit(main(configure_output=True))


if __name__ == "__main__":
    entry_point()

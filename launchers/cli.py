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
import sys
from pathlib import Path

from lbva.checkpoints_tools import cli as checkpoints_cli
from lbva.errors import UserError
from lbva.evaluation import cli as evaluation_cli
from lbva.inference import cli as inference_cli
from lbva.parallelism import plan
from lbva.training import cli as training_cli
from lbva.training.data import cli as data_cli

from .local import DEFAULT_MAX_RESTARTS


class CommandParser(argparse.ArgumentParser):
    """The parser of every `lbva` (sub)command: subparsers take the class of their parent, so
    every level reports a usage mistake as one line."""

    def error(self, message: str):  # one line, not usage + error
        raise UserError(f"{self.prog}: {message}")


def _load_config(args: argparse.Namespace):
    from lbva.training.config import TrainConfig
    from lbva.training.config_io import load_config

    return load_config(TrainConfig, args.config, args.overrides)


def _load_recipe(path: Path, overrides: list[str]) -> plan.Recipe:
    """What `lbva plan --config` plans from a training config."""
    from lbva.parallelism.flops import SequenceMix
    from lbva.training.config import TrainConfig
    from lbva.training.config_io import load_config

    config = load_config(TrainConfig, path, overrides)
    data, objective = config.data, config.objective
    mix = SequenceMix(
        token_budget=data.token_budget, window_frames=data.window_frames, text_tokens=data.text_tokens,
        chunk_sizes=tuple(objective.chunk_size), attention_windows=tuple(objective.attention_window),
        forward_dynamics=objective.forward_dynamics_weight > 0, pad_multiple=data.pad_multiple,
    )
    return plan.Recipe(name=path.name, preset=config.model.preset, parallel=config.parallel, mix=mix,
                       steps=config.run.steps, attention="sdpa" if config.model.attention == "sdpa" else "flex",
                       ema=config.optim.ema_decay > 0)


def _cmd_train(args: argparse.Namespace) -> None:
    from lbva.training.distributed import world_from_env

    from .local import run_worker
    from .signals import StopFlag, ignore_stop_signals
    from .slurm import requeue_after_time_limit

    # Handlers first: a signal that arrives while the model is built must still stop the run at
    # its first step boundary.
    stop = StopFlag().install()
    outcome = run_worker(_load_config(args), stop)
    ignore_stop_signals()
    if not args.no_requeue:
        requeue_after_time_limit(outcome)
    if outcome.finished and world_from_env().rank == 0:
        print(f"run finished: {outcome.run_dir} ({outcome.steps} steps)")


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
    launch_local(config, args.config, args.overrides, nproc, args.max_restarts)


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
    plan.register(commands, load_recipe=_load_recipe)  # plan
    # `export` gathers what two packages write from a checkpoint; neither imports the other.
    export_kinds = commands.add_parser("export", help="export a checkpoint").add_subparsers(
        dest="export_kind", required=True)
    checkpoints_cli.register_export(export_kinds)  # export post-training
    inference_cli.register_export(export_kinds)  # export inference
    checkpoints_cli.register(commands)  # import, ckpt
    inference_cli.register(commands)  # serve
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `lbva ARGV`; returns the exit status (2 for a user mistake, printed as one line)."""
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except UserError as error:
        print(f"lbva: error: {error}", file=sys.stderr)
        return 2
    return 0


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()

"""The checks a launch makes on the submitting machine before it starts or submits anything: the
run's parallel layout against the ranks the allocation gives it, its data and its run folder.
Every rank makes them again at start (the trainer); here they end a run that cannot start in one
line, before torchrun starts workers or a job waits in the queue for nothing."""

from __future__ import annotations

from lbva.errors import UserError
from lbva.parallelism.mesh import validate_layout
from lbva.training.config import TrainConfig
from lbva.training.data.source import check_data_config


def check_before_launch(config: TrainConfig, world_size: int, allocation: str) -> None:
    """Raise UserError unless `config` can run on `world_size` ranks; `allocation` says where that
    number comes from (e.g. "2 node(s) x 8 rank(s) = 16 ranks") and begins the message."""
    try:
        validate_layout(
            config.parallel, world_size, model=config.model.model_config(),
            token_budget=config.data.token_budget, pad_multiple=config.data.pad_multiple,
        )
    except UserError as error:
        raise UserError(f"{allocation}: {error}") from error
    check_data_config(config)
    config.run.make_dir()

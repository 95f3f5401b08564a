"""Two gloo ranks: a NaN gradient on one rank alone makes both skip the step (no update, no hang),
and the streak stops both with the same error after the same checkpoint."""

import pytest
from rich.console import Console

from lbva.checkpoints_tools.manager import committed_steps
from lbva.errors import UserError
from lbva.training import trainer

from harness import spawn_ranks
from helpers import prepared_demo
from test_nonfinite_guard import nonfinite_config, poison_gradients


def poisoned_rank(config, bad_steps: set[int]) -> tuple[str | None, list[int]]:
    with pytest.MonkeyPatch.context() as patch:
        updates = poison_gradients(patch, bad_steps, only_rank=1)
        try:
            trainer.train(config, Console(quiet=True))
        except UserError as error:
            return str(error), updates
    raise AssertionError("the run did not stop")


def test_a_nan_on_one_rank_is_skipped_on_both_and_the_streak_stops_both(tmp_path):
    dataset = prepared_demo(tmp_path / "data", num_episodes=4, frames_per_episode=33, image_size=64, seed=1)
    config = nonfinite_config(dataset, tmp_path, "run.steps=6", "optim.max_nonfinite_steps=2", "run.name=ranks",
                              "parallel.dp_shard=2")
    results = spawn_ranks(2, poisoned_rank, config, {2, 3})
    assert [updates for _, updates in results] == [[1], [1]]
    assert all(error.startswith("optim.max_nonfinite_steps: 2 steps in a row (up to step 3)") for error, _ in results)
    assert committed_steps(tmp_path / "ranks" / "checkpoints") == [3]

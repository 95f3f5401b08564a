"""Ulysses context parallelism, single-process parts: the token order the all-to-all produces and
the mask for that order."""

import torch

from lbva.models.masks import dense_self_attention_mask
from lbva.parallelism.context_parallel import gathered_layout, gathered_order
from lbva.training.config import ObjectiveConfig
from lbva.training.step import FlowMatchingObjective

CPU = torch.device("cpu")


def test_gathered_order_puts_each_ranks_video_shard_before_its_action_shard():
    # 4 video tokens (0-3), 2 action tokens (4-5), cp 2: rank 0 holds [0, 1 | 4], rank 1 [2, 3 | 5].
    assert gathered_order(4, 2, 2).tolist() == [0, 1, 4, 2, 3, 5]


def _objective(**config) -> FlowMatchingObjective:
    return FlowMatchingObjective(ObjectiveConfig(**config), torch.zeros(6, 32))


def _sequence(parity_case, index: int):
    return parity_case(steps=1, seed=index).batches[0][0][0]


def test_gathered_mask_is_the_full_mask_with_rows_and_columns_permuted(parity_case):
    seq = _sequence(parity_case, 0)
    objective = _objective(chunk_size=(2, 2), attention_window=(3, 3))
    batch = objective.prepare(seq, objective.draw(seq, torch.Generator().manual_seed(0)), (1, 2, 2), CPU)
    order = gathered_order(batch.num_video, batch.num_action, 4)
    full = dense_self_attention_mask(batch.layout)
    gathered = dense_self_attention_mask(gathered_layout(batch.layout, batch.num_video, 4))
    assert torch.equal(gathered, full[:, :, order][:, :, :, order])

"""Data and tensor parallel training equals single-process training: same losses, first-step
gradients and parameters after 3 AdamW steps of the tiny model on gloo ranks.

Activation checkpointing rides along on two layouts: it must not change a single number either
(and the last test shows it does recompute the depths it is asked to).
"""

import pytest
from lbva.models.config import get_preset
from lbva.models.mot import LingBotVA
from lbva.parallelism.activation_checkpoint import apply_activation_checkpointing
from lbva.parallelism.mesh import ParallelConfig
from lbva.training.step import FlowMatchingObjective

from harness import CPU, parallel_run, reference_run

LAYOUTS = {
    "fsdp": (ParallelConfig(dp_shard=2), 2),
    "hsdp_selective_checkpointing": (
        ParallelConfig(dp_replicate=2, dp_shard=2, activation_checkpoint="selective", checkpoint_every=2), 4,
    ),
    "tp_sequence_parallel": (ParallelConfig(tp=2, dp_shard=1), 2),
    "tp_fsdp_full_checkpointing": (ParallelConfig(tp=2, dp_shard=2, activation_checkpoint="full"), 4),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mot_trains_as_in_one_process(layout, parity_case, assert_parity):
    parallel, world_size = LAYOUTS[layout]
    case = parity_case("tiny-mot", dp_size=parallel.dp_replicate * parallel.dp_shard)
    assert_parity(reference_run(case), parallel_run(case, parallel, world_size))


def test_shared_layout_trains_as_in_one_process_under_tp(parity_case, assert_parity):
    case = parity_case("tiny-shared")
    assert_parity(reference_run(case), parallel_run(case, ParallelConfig(tp=2, dp_shard=1), 2))


@pytest.mark.parametrize("mode, expected_calls", [("full", [2, 2]), ("selective", [2, 1])])
def test_checkpointed_depths_run_their_forward_again_in_backward(mode, expected_calls, parity_case):
    case = parity_case("tiny-mot")
    seq, draws = case.batches[0][0]
    model = LingBotVA(get_preset("tiny-mot"))
    apply_activation_checkpointing(model.depths(), mode, every=2)
    calls = [0, 0]
    for depth, block in enumerate(model.blocks):
        block.attn1.to_q.register_forward_hook(lambda *_, depth=depth: calls.__setitem__(depth, calls[depth] + 1))
    objective = FlowMatchingObjective(case.objective, case.empty_text)
    objective(model, seq, draws, "sdpa", CPU).total.backward()
    assert calls == expected_calls

"""The clipping norm is the single-process norm under sharded layouts (FSDP, TP, CP mixes)."""

import pytest
import torch
import torch.distributed as dist

from lbva.models.config import get_preset
from lbva.parallelism.grad_norm import clip_grad_norm_
from lbva.parallelism.mesh import ParallelConfig, ParallelDims
from lbva.parallelism.parallelize import parallelize, step_layout_for
from lbva.training.step import FlowMatchingObjective, run_objective

from harness import build_case_model, spawn_ranks

CPU = torch.device("cpu")


def _reference_norm(case) -> float:
    model = build_case_model(case)
    objective = FlowMatchingObjective(case.objective, case.empty_text)
    seq, draws = case.batches[0][0]
    objective(model, seq, draws, "sdpa", CPU).total.backward()
    return torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None)).item()


def _rank_norm(case, parallel: ParallelConfig) -> float:
    dims = ParallelDims.resolve(parallel, dist.get_world_size(), model=get_preset(case.preset),
                                token_budget=case.token_budget, pad_multiple=case.pad_multiple)
    mesh = dims.build_mesh("cpu")
    model = parallelize(build_case_model(case), mesh, parallel)
    objective = FlowMatchingObjective(case.objective, case.empty_text)
    seq, draws = case.batches[0][0]
    run_objective(objective, model, [(seq, draws)], step_layout_for(mesh, "sdpa"), CPU).total.backward()
    return clip_grad_norm_(model.parameters(), max_norm=1e9)


@pytest.mark.parametrize("layout", [
    ParallelConfig(dp_shard=2, tp=2),
    ParallelConfig(dp_shard=2, cp=2),
])
def test_global_grad_norm_matches_the_single_process_norm(parity_case, layout):
    case = parity_case("tiny-mot", dp_size=1, steps=1)
    expected = _reference_norm(case)
    world = layout.dp_shard * layout.tp * layout.cp
    # Every dp rank trains the case's one sequence, so the dp-mean gradient is the reference's.
    norms = spawn_ranks(world, _rank_norm, case, layout)
    for norm in norms:
        assert abs(norm - expected) <= 1e-5 * expected

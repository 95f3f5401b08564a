"""The parallel layout is checked against the world and the model before any process group exists,
and the mesh built from it gives every rank its place."""

import pytest
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from lbva.models.config import get_preset
from lbva.parallelism.mesh import ParallelConfig, ParallelDims, validate_layout
from lbva.errors import UserError

FULL = get_preset("lingbot-va-5b-mot")  # 24 heads, 30 layers


def resolve(world_size: int, model=FULL, token_budget: int = 10240, pad_multiple: int = 128, **sizes) -> ParallelDims:
    return ParallelDims.resolve(
        ParallelConfig(**sizes), world_size, model=model, token_budget=token_budget, pad_multiple=pad_multiple
    )


def test_dp_shard_takes_the_ranks_the_other_dims_leave():
    dims = resolve(64, dp_replicate=2, tp=4, cp=2)
    assert (dims.pp, dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp) == (1, 2, 4, 2, 4)
    assert dims.dp_size == 8


def test_a_layout_that_does_not_fill_the_world_is_refused():
    with pytest.raises(UserError, match=r"pp \(1\) x dp_replicate \(1\) x dp_shard \(3\) x cp \(1\) x tp \(2\) = 6, "
                                        r"but the world size is 8"):
        resolve(8, dp_shard=3, tp=2)


def test_the_other_dims_must_divide_the_world_when_dp_shard_is_inferred():
    with pytest.raises(UserError, match=r"= 3 does not divide the world size \(8\)"):
        resolve(8, tp=3)


def test_heads_must_split_over_tp_and_cp():
    with pytest.raises(UserError, match=r"^parallel: tp \(3\) x cp \(2\) = 6 does not divide num_heads \(4\)$"):
        resolve(6, model=get_preset("tiny-mot"), tp=3, cp=2, pad_multiple=96)


def test_depth_must_split_over_pipeline_stages_and_virtual_stages():
    with pytest.raises(UserError, match=r"pp \(4\) x pp_virtual_stages \(2\) = 8 pipeline stages do not divide "
                                        r"num_layers \(30\)"):
        resolve(4, pp=4, pp_virtual_stages=2)


def test_token_budget_must_split_over_cp():
    with pytest.raises(UserError, match=r"cp \(4\) does not divide the token budget \(10242\)"):
        resolve(4, cp=4, token_budget=10242)


def test_each_stream_padding_must_split_over_tp_and_cp():
    with pytest.raises(UserError, match=r"tp \(4\) x cp \(2\) = 8 does not divide data.pad_multiple \(36\)"):
        resolve(8, tp=4, cp=2, pad_multiple=36)


@pytest.mark.parametrize("field", ["pp", "dp_replicate", "cp", "tp", "pp_virtual_stages", "checkpoint_every"])
def test_sizes_below_one_are_refused(field):
    with pytest.raises(UserError, match=f"parallel: {field} must be >= 1"):
        resolve(8, **{field: 0})


def test_errors_are_one_line():
    with pytest.raises(UserError) as error:
        resolve(8, tp=3, dp_shard=1)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "rank, dp_rank, tp_group, logs",
    [(0, 0, [0, 1], False), (5, 2, [4, 5], False), (8, 0, [8, 9], True), (13, 2, [12, 13], False)],
)
def test_mesh_gives_each_rank_its_data_shard_and_group(rank, dp_rank, tp_group, logs):
    # pp 2 x dp_replicate 2 x dp_shard 2 x tp 2 on 16 ranks; a fake process group builds rank
    # `rank`'s view of the mesh in this process.
    dims = resolve(16, pp=2, dp_replicate=2, dp_shard=2, tp=2)
    dist.init_process_group("fake", rank=rank, world_size=16, store=FakeStore())
    try:
        mesh = dims.build_mesh("cpu")
        assert mesh.world.mesh_dim_names == ("pp", "dp_replicate", "dp_shard", "cp", "tp")
        assert mesh.dp_rank == dp_rank
        assert mesh["tp"].mesh.tolist() == tp_group
        assert mesh.is_logging_rank == logs
        # HSDP: replicate across dp_replicate, shard within dp_shard x cp
        assert mesh.fsdp_mesh.mesh_dim_names == ("dp_replicate", "dp_shard_cp")
        assert mesh.fsdp_mesh.mesh.shape == (2, 2)
    finally:
        dist.destroy_process_group()


def validate(world_size: int, model=FULL, **sizes) -> ParallelDims:
    return validate_layout(ParallelConfig(**sizes), world_size, model=model, token_budget=10240, pad_multiple=128)


def test_a_run_layout_is_checked_by_the_mesh_rules_too():
    with pytest.raises(UserError, match=r"= 3 does not divide the world size \(8\)"):
        validate(8, tp=3)
    assert validate(16, tp=2).dp_shard == 8


def test_interleaved_stages_take_microbatches_in_multiples_of_pp():
    with pytest.raises(UserError, match=r"^parallel: microbatches \(3\) must be a multiple of pp \(2\)"):
        validate(2, pp=2, pp_virtual_stages=3, dp_shard=1, microbatches=3)
    assert validate(2, pp=2, pp_virtual_stages=3, dp_shard=1, microbatches=4).pp == 2


def test_virtual_stages_need_pipeline_stages():
    with pytest.raises(UserError, match=r"^parallel: pp_virtual_stages \(2\) > 1 needs pipeline stages \(pp 1\)"):
        validate(2, pp_virtual_stages=2)


def test_1f1b_needs_at_least_pp_microbatches():
    with pytest.raises(UserError, match=r"^parallel: microbatches \(1\) must be >= pp \(2\)"):
        validate(2, pp=2, dp_shard=1)


def test_microbatches_accumulate_without_pipeline_stages():
    assert validate(2, microbatches=2).dp_shard == 2
    with pytest.raises(UserError, match=r"^parallel: microbatches must be >= 1, got 0"):
        validate(2, microbatches=0)


def test_transformer_engine_fp8_does_not_combine_with_tensor_parallel():
    with pytest.raises(UserError, match=r"^parallel: fp8=te with tp \(2\) > 1"):
        validate(2, tp=2, fp8="te")

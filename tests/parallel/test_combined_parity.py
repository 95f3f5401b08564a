"""Context and pipeline parallelism combined with tensor and data parallelism train exactly like
one process (three AdamW steps: losses, first-step gradients and parameters)."""

from harness import parallel_run, reference_run
from lbva.parallelism.mesh import ParallelConfig

from test_cp_parity import assert_small_gaps, parity_gaps
from test_pp_parity import pipeline_train_rank


def test_tp2_cp2_matches_one_process(parity_case):
    case = parity_case("tiny-mot")
    record = parallel_run(case, ParallelConfig(tp=2, cp=2, dp_shard=1), 4)
    gaps = parity_gaps(record, reference_run(case))
    assert_small_gaps(gaps)


def test_pp2_tp2_matches_one_process(parity_case):
    case = parity_case("tiny-mot", dp_size=2)  # two microbatches per step
    record = parallel_run(case, ParallelConfig(pp=2, tp=2, dp_shard=1), 4, rank_fn=pipeline_train_rank)
    gaps = parity_gaps(record, reference_run(case))
    assert_small_gaps(gaps)


def test_pp2_dp_shard2_matches_one_process(parity_case):
    case = parity_case("tiny-mot", dp_size=4)  # two dp ranks x two microbatches per step
    record = parallel_run(case, ParallelConfig(pp=2, dp_shard=2), 4, rank_fn=pipeline_train_rank)
    gaps = parity_gaps(record, reference_run(case))
    assert_small_gaps(gaps)


def test_dp_shard2_tp2_cp2_matches_one_process(parity_case):
    case = parity_case("tiny-mot", dp_size=2)
    record = parallel_run(case, ParallelConfig(dp_shard=2, tp=2, cp=2), 8)
    gaps = parity_gaps(record, reference_run(case))
    assert_small_gaps(gaps)

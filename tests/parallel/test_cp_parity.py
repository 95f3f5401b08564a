"""Ulysses context parallelism trains exactly like one process: losses, first-step gradients and
parameters after three AdamW steps match the single-process run of the same sequences and draws."""

from harness import PARAMETER_TOLERANCE, TrainRecord, parallel_run, reference_run
from lbva.parallelism.mesh import ParallelConfig


def parity_gaps(record: TrainRecord, reference: TrainRecord) -> dict[str, float]:
    """Largest relative loss difference over the steps, largest first-step gradient difference
    relative to that gradient's largest entry, largest absolute parameter difference."""
    assert record.parameters.keys() == reference.parameters.keys()
    assert record.gradients.keys() == reference.gradients.keys()
    return {
        "loss": max(abs(a - b) / abs(b) for a, b in zip(record.losses, reference.losses, strict=True)),
        "gradient": max(
            ((record.gradients[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)).item()
            for n, g in reference.gradients.items()
        ),
        "parameter": max((record.parameters[n] - p).abs().max().item() for n, p in reference.parameters.items()),
    }


def assert_small_gaps(gaps: dict[str, float]) -> None:
    """Losses within 1e-5 (relative), gradients within 2e-5 of each tensor's largest entry (the
    context-parallel attention merges its shards' softmax partial sums in another order, 1.01e-5
    measured), parameters within PARAMETER_TOLERANCE."""
    assert gaps["loss"] < 1e-5 and gaps["gradient"] < 2e-5 and gaps["parameter"] < PARAMETER_TOLERANCE, gaps


def test_cp2_matches_one_process(parity_case):
    case = parity_case("tiny-mot")
    record = parallel_run(case, ParallelConfig(cp=2, dp_shard=1), 2)
    gaps = parity_gaps(record, reference_run(case))
    assert_small_gaps(gaps)


def test_cp2_matches_one_process_in_the_shared_layout(parity_case):
    case = parity_case("tiny-shared")
    record = parallel_run(case, ParallelConfig(cp=2, dp_shard=1), 2)
    gaps = parity_gaps(record, reference_run(case))
    assert_small_gaps(gaps)

"""The trainer drives interleaved 1F1B (pp 2 x 2 virtual stages): it trains as one process that
accumulates the same two sequences per step, writes the same evaluation loss (forward only through
the stages) and the same model.safetensors (gathered from both stages), and its checkpoints resume
on one process or on dp 2 and the other way round."""

import shutil

import pytest
from safetensors.torch import load_file

from test_distributed_resume import _losses, _overrides, _torchrun, prepared  # noqa: F401 (fixture)
from lbva.training.metrics import read_metrics

INTERLEAVED = (2, ["parallel.pp=2", "parallel.pp_virtual_stages=2", "parallel.dp_shard=1", "parallel.microbatches=2"])
ONE_PROCESS = (1, ["parallel.microbatches=2"])
DP2 = (2, ["parallel.dp_shard=2"])


def _run(prepared, out, name, steps, layout, *extra):
    nproc, options = layout
    _torchrun(nproc, _overrides(prepared, out, name, steps, "model.preset=demo-mot", *options, *extra))
    return out / name


@pytest.fixture(scope="module")
def straight(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return {"interleaved": _run(prepared, out, "interleaved", 4, INTERLEAVED),
            "one_process": _run(prepared, out, "one_process", 4, ONE_PROCESS)}


def _close(got: dict, expected: dict, steps) -> None:
    for step in steps:
        assert abs(got[step] - expected[step]) <= 1e-5 * abs(expected[step]), (step, got, expected)


def test_interleaved_stages_train_evaluate_and_export_as_one_process(straight):
    _close(_losses(straight["interleaved"]), _losses(straight["one_process"]), range(1, 5))
    evals = [{r["step"]: r["loss_eval"] for r in read_metrics(run / "metrics.jsonl")} for run in straight.values()]
    _close(evals[0], evals[1], range(1, 5))
    pipeline, single = (load_file(run / "model.safetensors") for run in straight.values())
    assert pipeline.keys() == single.keys()
    assert all((pipeline[name] - single[name]).abs().max() <= 1e-5 for name in single)


@pytest.fixture(scope="module")
def first_legs(prepared, tmp_path_factory):
    """2 of the 4 steps, once per saved layout; each test resumes a copy."""
    out = tmp_path_factory.mktemp("first_legs")
    return {name: _run(prepared, out / name, "split", 2, layout)
            for name, layout in (("interleaved", INTERLEAVED), ("one_process", ONE_PROCESS))}


@pytest.mark.parametrize("saved, resumed, reference", [
    ("interleaved", ONE_PROCESS, "one_process"),
    ("interleaved", DP2, "one_process"),
    ("one_process", INTERLEAVED, "interleaved"),
], ids=["interleaved_to_one_process", "interleaved_to_dp2", "one_process_to_interleaved"])
def test_a_checkpoint_reshards_across_interleaved_stages(prepared, tmp_path, straight, first_legs, saved, resumed,
                                                         reference):
    shutil.copytree(first_legs[saved], tmp_path / "split")
    run = _run(prepared, tmp_path, "split", 4, resumed, "checkpoint.resume=auto")
    _close(_losses(run), _losses(straight[reference]), (3, 4))

"""The moving average of the weights (optim.ema_decay): its update rule, resume, and export."""

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from rich.console import Console
from safetensors.torch import load_file

from lbva.checkpoints_tools.export import CheckpointError, export_post_training, write_weights_checkpoint
from lbva.launchers.cli import main as lbva
from lbva.models.config import get_preset
from lbva.models.mot import LingBotVA
from lbva.training.ema import WeightEMA, build_ema
from lbva.training.trainer import train

from helpers import prepared_demo, tiny_train_config

DECAY = 0.5  # large steps: an average visibly apart from the weights after a few steps


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return prepared_demo(tmp_path_factory.mktemp("data"), num_episodes=4, frames_per_episode=41, image_size=64, seed=1)


def _config(dataset, out, *overrides):
    return tiny_train_config(dataset, out, f"optim.ema_decay={DECAY}", *overrides)


@pytest.fixture(scope="module")
def straight_run(dataset, tmp_path_factory):
    return train(_config(dataset, tmp_path_factory.mktemp("runs"), "run.name=straight", "run.steps=4"),
                 Console(quiet=True))


def _last_checkpoint(run):
    return run.run_dir / "checkpoints" / f"step_{run.steps:08d}"


def _saved_ema(checkpoint) -> dict[str, torch.Tensor]:
    """The average tensors as the checkpoint stores them, read by DCP directly."""
    params = dict(LingBotVA(get_preset("tiny-mot")).named_parameters())
    saved = {"train": {"ema": {"weights": {name: torch.empty_like(p) for name, p in params.items()}}}}
    dcp.load(saved, checkpoint_id=str(checkpoint))
    return saved["train"]["ema"]["weights"]


def test_the_first_update_copies_the_weights_and_later_ones_lerp_towards_them():
    weight = torch.nn.Parameter(torch.zeros(3))
    model = torch.nn.Module()
    model.weight = weight
    optimizer = torch.optim.SGD([weight], lr=1.0)
    ema = build_ema(model, optimizer, 0.75)
    for target in (4.0, 8.0):
        weight.grad = weight.detach() - target  # one SGD step moves the weight onto target
        optimizer.step()
    assert torch.equal(ema.weights["weight"], torch.full((3,), 0.75 * 4.0 + 0.25 * 8.0))
    assert ema.updates == 2


def test_no_ema_is_kept_with_decay_zero():
    model = torch.nn.Linear(2, 2)
    assert build_ema(model, torch.optim.SGD(model.parameters(), lr=1.0), 0.0) is None


def test_an_interrupted_and_resumed_run_has_the_ema_of_a_straight_run(dataset, tmp_path, straight_run):
    stopped = train(_config(dataset, tmp_path, "run.name=split", "run.steps=4"), Console(quiet=True),
                    stop=lambda step: step == 2)
    assert stopped.steps == 2
    resumed = train(_config(dataset, tmp_path, "run.name=split", "run.steps=4", "checkpoint.resume=auto"),
                    Console(quiet=True))
    a, b = _saved_ema(_last_checkpoint(straight_run)), _saved_ema(_last_checkpoint(resumed))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_export_with_ema_writes_the_average_not_the_weights(straight_run, tmp_path):
    checkpoint = _last_checkpoint(straight_run)
    assert lbva(["export", "post-training", str(checkpoint), str(tmp_path / "ema"), "--ema"]) == 0
    export_post_training(checkpoint, tmp_path / "raw")
    exported = {}
    for kind in ("ema", "raw"):
        for shard in (tmp_path / kind / "transformer").glob("*.safetensors"):
            exported.setdefault(kind, {}).update(load_file(shard))
    averaged = _saved_ema(checkpoint)
    assert set(averaged) <= set(exported["ema"])
    for name, tensor in averaged.items():
        assert torch.equal(exported["ema"][name], tensor.to(torch.bfloat16)), name
    differing = [name for name in averaged if not torch.equal(exported["ema"][name], exported["raw"][name])]
    assert len(differing) > len(averaged) // 2


def test_inference_export_with_ema_serves_the_average(straight_run, tmp_path):
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"q01": [-1.0] * 30, "q99": [1.0] * 30}))
    out = tmp_path / "bundle"
    status = lbva(["export", "inference", str(_last_checkpoint(straight_run)), str(out), "--ema", "--cameras", "top",
                   "--height", "64", "--width", "64", "--actions-per-frame", "4", "--stats", str(stats),
                   "--action-channels", "0,1", "--text-tokens", "8"])
    assert status == 0
    assert json.loads((out / "bundle.json").read_text())["source"]["weights"] == "ema"
    weights = {}
    for shard in (out / "transformer").glob("*.safetensors"):
        weights.update(load_file(shard))
    averaged = _saved_ema(_last_checkpoint(straight_run))
    assert all(torch.equal(weights[name], t.to(torch.bfloat16)) for name, t in averaged.items())


def test_export_with_ema_of_a_checkpoint_without_one_is_refused(tmp_path):
    checkpoint = write_weights_checkpoint(LingBotVA(get_preset("tiny-mot")), tmp_path / "ckpt", "tiny-mot", "test")
    with pytest.raises(CheckpointError, match="no EMA"):
        export_post_training(checkpoint, tmp_path / "out", ema=True)
    assert lbva(["export", "post-training", str(checkpoint), str(tmp_path / "out"), "--ema"]) == 2


def test_the_ema_of_sharded_parameters_is_sharded_alike():
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    from torch.distributed.device_mesh import init_device_mesh
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("needs a fresh process group")
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = torch.nn.Module()
        model.weight = torch.nn.Parameter(distribute_tensor(torch.arange(4.0), mesh, [Shard(0)]))
        ema = WeightEMA(model, 0.9)
        ema.update()
        assert isinstance(ema.weights["weight"], DTensor)
        assert ema.weights["weight"].placements == model.weight.placements
    finally:
        dist.destroy_process_group()


def test_turning_the_ema_on_at_resume_starts_it_from_the_resumed_weights(dataset, tmp_path):
    without = tiny_train_config(dataset, tmp_path, "run.name=late", "run.steps=4")
    train(without, Console(quiet=True), stop=lambda step: step == 2)
    resumed = train(_config(dataset, tmp_path, "run.name=late", "run.steps=3", "checkpoint.resume=auto"),
                    Console(quiet=True))
    assert resumed.steps == 3
    # One update after the resume: the first copies the weights, so the average is step 3's weights.
    checkpoint = _last_checkpoint(resumed)
    weights = {"train": {"model": {n: torch.empty_like(p) for n, p in _saved_ema(checkpoint).items()}}}
    dcp.load(weights, checkpoint_id=str(checkpoint))
    averaged = _saved_ema(checkpoint)
    assert all(torch.equal(averaged[name], weights["train"]["model"][name]) for name in averaged)

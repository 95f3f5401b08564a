"""`lbva export inference` and `lbva serve` argument handling, and loading a bundle."""

import argparse
import json
from dataclasses import asdict

import pytest
import torch
from safetensors import safe_open
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from inference_fixtures import bundle_spec, tiny_bundle, tiny_model
from lbva.checkpoints_tools.export import write_weights_checkpoint
from lbva.checkpoints_tools.manager import CheckpointManager, RetentionPolicy
from lbva.inference.bundle import export_inference_bundle, load_bundle
from lbva.inference.cli import register, register_export
from lbva.errors import UserError


def cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    export_kinds = commands.add_parser("export").add_subparsers(dest="kind", required=True)
    register_export(export_kinds)
    register(commands)
    args = parser.parse_args(argv)
    args.func(args)


def training_run(tmp_path, model):
    """A checkpoint laid out as the trainer writes it: RUN/checkpoints/step_N, RUN/data_stats.json,
    with the training config in the checkpoint's metadata."""
    run = tmp_path / "run"
    manager = CheckpointManager(run / "checkpoints", RetentionPolicy(keep_last=1), async_save=False)
    meta = json.loads(json.dumps({"model": asdict(model.config), "config": {
        "data": {"action_channels": [3, 7], "text_tokens": 12},
        "objective": {"video_shift": 4.0, "action_shift": 0.05}}}))
    manager.save(20, {"train": {"model": get_model_state_dict(model)}}, meta)
    q01, q99 = [0.0] * 30, [0.0] * 30
    q01[3], q99[3], q01[7], q99[7] = -2.0, 2.0, 0.0, 1.0
    (run / "data_stats.json").write_text(json.dumps({"lerobot": {"q01": q01, "q99": q99}}))
    return run / "checkpoints" / "step_00000020"


def test_export_takes_what_the_training_run_recorded_and_writes_bf16_weights(tmp_path):
    model = tiny_model()
    checkpoint = training_run(tmp_path, model)
    out = tmp_path / "bundle"
    cli(["export", "inference", str(checkpoint), str(out), "--cameras", "top,wrist", "--height", "64",
         "--width", "64", "--actions-per-frame", "8", "--video-stop-sigma", "0.4", "--chunk-size", "2"])

    bundle = json.loads((out / "bundle.json").read_text())
    assert bundle["source"]["step"] == 20
    assert bundle["actions"]["channels"] == [3, 7] and bundle["actions"]["actions_per_frame"] == 8
    assert bundle["actions"]["q01"][3] == -2.0 and bundle["actions"]["q99"][7] == 1.0
    assert bundle["cameras"] == {"keys": ["top", "wrist"], "layout": "side_by_side", "camera_sizes": [[64, 64]] * 2}
    assert bundle["encoders"] == {"kind": "standin"} and bundle["text_tokens"] == 12
    defaults = bundle["defaults"]
    assert (defaults["video_shift"], defaults["action_shift"]) == (4.0, 0.05)
    assert (defaults["video_stop_sigma"], defaults["chunk_size"], defaults["video_steps"]) == (0.4, 2, 5)
    assert json.loads((out / "transformer" / "config.json").read_text())["attn_mode"] == "torch"
    for shard in (out / "transformer").glob("*.safetensors"):
        with safe_open(str(shard), "pt") as weights:
            assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}

    loaded = load_bundle(out)
    assert loaded.spec.action_channels == (3, 7)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor.to(torch.bfloat16).float())
    runtime = loaded.runtime(overrides={"video_steps": 2})
    assert runtime.settings.video_steps == 2 and runtime.settings.video_stop_sigma == 0.4


def test_export_names_what_the_checkpoint_does_not_record(tmp_path):
    checkpoint = write_weights_checkpoint(tiny_model(), tmp_path / "weights", "tiny-mot", "test")
    with pytest.raises(UserError, match="--cameras/--height/--width, --stats, --action-channels"):
        cli(["export", "inference", str(checkpoint), str(tmp_path / "out")])


def test_export_refuses_cameras_the_model_cannot_patchify(tmp_path):
    model = tiny_model()
    checkpoint = training_run(tmp_path, model)
    with pytest.raises(UserError, match="multiples of 32"):
        cli(["export", "inference", str(checkpoint), str(tmp_path / "out"), "--cameras", "top", "--height", "48",
             "--width", "64", "--actions-per-frame", "4"])


def test_a_bundle_is_not_overwritten(tmp_path):
    model = tiny_model()
    checkpoint = write_weights_checkpoint(model, tmp_path / "weights", "tiny-mot", "test")
    export_inference_bundle(checkpoint, tmp_path / "bundle", bundle_spec(model))
    with pytest.raises(UserError, match="already holds"):
        export_inference_bundle(checkpoint, tmp_path / "bundle", bundle_spec(model))


def test_loading_a_folder_without_bundle_json_says_how_to_make_one(tmp_path):
    with pytest.raises(UserError, match="lbva export inference"):
        load_bundle(tmp_path)


def test_serve_refuses_an_empty_token_file(tmp_path):
    (tmp_path / "token").write_text("\n")
    with pytest.raises(UserError, match="empty"):
        cli(["serve", str(tmp_path), "--token-file", str(tmp_path / "token")])


@pytest.mark.parametrize("flags, message", [
    (["--parallel-requests", "0"], "--parallel-requests must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--batch-sessions", "on", "--parallel-requests", "2"], "need batching off .--batch-sessions off."),
])
def test_serve_refuses_a_scheduling_it_cannot_run_naming_the_option(tmp_path, flags, message):
    bundle = tiny_bundle(tmp_path)
    with pytest.raises(UserError, match=message):
        cli(["serve", str(bundle), "--port", "0", *flags])


def test_export_can_take_the_robot_interface_from_a_prepared_data_card(tmp_path):
    model = tiny_model()
    checkpoint = write_weights_checkpoint(model, tmp_path / "weights", "tiny-mot", "test")
    q01, q99 = [0.0] * 30, [0.0] * 30
    q01[0], q99[0] = -1.0, 1.0
    card = {"format_version": 1, "encoders": {"kind": "standin", "video": {}, "text": {}}, "sources": {"robot": {
        "cameras": ["observation.images.high", "observation.images.left", "observation.images.right"],
        "tiling": {"layout": "robotwin_tshape", "camera_sizes": [[64, 64], [32, 32], [32, 32]]},
        "action_channels": [0], "actions_per_frame": 16, "stats": {"q01": q01, "q99": q99}}}}
    (tmp_path / "card.json").write_text(json.dumps(card))
    out = tmp_path / "bundle"
    cli(["export", "inference", str(checkpoint), str(out), "--card", str(tmp_path / "card.json"), "--source", "robot",
         "--text-tokens", "8"])
    spec = load_bundle(out).spec
    assert spec.cameras.keys[0] == "observation.images.high" and spec.cameras.tiling.layout == "robotwin_tshape"
    assert spec.actions_per_frame == 16 and spec.action_channels == (0,) and spec.stats.q99[0] == 1.0


def test_export_of_a_run_on_one_prepared_source_needs_no_card(tmp_path):
    # The trainer writes the prepared datasets' cards into data_stats.json; with one source the
    # card's robot interface is the run's, so `lbva export inference CKPT OUT` needs nothing more.
    model = tiny_model()
    run = tmp_path / "run"
    manager = CheckpointManager(run / "checkpoints", RetentionPolicy(keep_last=1), async_save=False)
    meta = json.loads(json.dumps({"model": asdict(model.config), "config": {"data": {"text_tokens": 8}}}))
    manager.save(5, {"train": {"model": get_model_state_dict(model)}}, meta)
    q01, q99 = [0.0] * 30, [0.0] * 30
    q01[2], q99[2] = -3.0, 3.0
    card = {"format_version": 1, "encoders": {"kind": "standin", "video": {}, "text": {}}, "sources": {"pusher": {
        "cameras": ["observation.images.top"], "tiling": {"layout": "side_by_side", "camera_sizes": [[64, 64]]},
        "action_channels": [2], "actions_per_frame": 4, "stats": {"q01": q01, "q99": q99}}}}
    (run / "data_stats.json").write_text(json.dumps({"/data/prepared": card}))
    out = tmp_path / "bundle"
    cli(["export", "inference", str(run / "checkpoints" / "step_00000005"), str(out)])
    spec = load_bundle(out).spec
    assert spec.cameras.keys == ("observation.images.top",) and spec.action_channels == (2,)
    assert spec.actions_per_frame == 4 and spec.stats.q01[2] == -3.0 and spec.text_tokens == 8


def test_the_bundle_records_the_guidance_scales_it_was_exported_with(tmp_path):
    model = tiny_model()
    checkpoint = training_run(tmp_path, model)
    out = tmp_path / "bundle"
    cli(["export", "inference", str(checkpoint), str(out), "--cameras", "top,wrist", "--height", "64",
         "--width", "64", "--actions-per-frame", "8", "--video-guidance", "1", "--action-guidance", "2.5"])
    defaults = json.loads((out / "bundle.json").read_text())["defaults"]
    assert (defaults["video_guidance"], defaults["action_guidance"]) == (1.0, 2.5)
    settings = load_bundle(out).runtime().settings
    assert (settings.video_guidance, settings.action_guidance) == (1.0, 2.5)

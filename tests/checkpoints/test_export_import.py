"""Export to the post-training layout and back; import of released and Wan2.2 weights."""

import json

import pytest
import torch
from rich.console import Console

from lbva.checkpoints_tools.cli import inspect_checkpoint
from lbva.checkpoints_tools.export import (
    export_post_training, import_checkpoint, load_lingbot_folder, load_model, write_weights_checkpoint,
)
from lbva.checkpoints_tools.post_training import probe_inputs
from lbva.models.attention import AttentionKernels, sdpa_kernel
from lbva.models.config import get_preset
from lbva.models.mot import LingBotVA
from lbva.models.weights import WeightImportError
from lbva.errors import UserError

diffusers = pytest.importorskip("diffusers")


def _outputs(model, inputs):
    with torch.no_grad():
        return model.eval()(inputs, AttentionKernels(sdpa_kernel(None), sdpa_kernel(None)))


@pytest.mark.parametrize("preset", ["tiny-shared", "tiny-mot"])
def test_export_then_reload_gives_the_same_outputs_within_bf16(tmp_path, preset):
    torch.manual_seed(0)
    model = LingBotVA(get_preset(preset))
    checkpoint = write_weights_checkpoint(model, tmp_path / "ckpt", preset, "test")
    folder = export_post_training(checkpoint, tmp_path / "export", max_shard_bytes=20_000)
    assert len(list(folder.glob("*.safetensors"))) > 1  # sharded, with an index
    reloaded = load_lingbot_folder(tmp_path / "export")
    inputs = probe_inputs(model.config)
    for ours, theirs in zip(_outputs(model, inputs), _outputs(reloaded, inputs)):
        assert torch.allclose(ours, theirs, atol=0.05, rtol=0.02)


def test_shared_export_uses_the_released_config_and_names(tmp_path):
    model = LingBotVA(get_preset("tiny-shared"))
    checkpoint = write_weights_checkpoint(model, tmp_path / "ckpt", "tiny-shared", "test")
    folder = export_post_training(checkpoint, tmp_path / "export", attn_mode="flashattn")
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "WanTransformer3DModel" and config["attn_mode"] == "flashattn"
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert "condition_embedder_action.text_embedder.linear_1.weight" in index["weight_map"]
    assert "blocks.1.attn1.norm_k.weight" in index["weight_map"]


def test_import_of_a_tiny_wan_model_equals_the_model_built_from_it(tmp_path):
    config = get_preset("tiny-mot")
    torch.manual_seed(0)
    wan = diffusers.WanTransformer3DModel(
        patch_size=config.patch_size, num_attention_heads=config.num_heads, attention_head_dim=config.head_dim,
        in_channels=48, out_channels=48, text_dim=config.text_dim, freq_dim=config.freq_dim,
        ffn_dim=config.video_ffn_dim, num_layers=config.num_layers,
    )
    wan.save_pretrained(tmp_path / "wan" / "transformer")
    checkpoint = import_checkpoint(tmp_path / "wan", tmp_path / "ckpt", "wan", "tiny-mot")
    imported = load_model(checkpoint)
    assert torch.equal(imported.blocks[1].ffn.net[2].weight, wan.blocks[1].ffn.net[2].weight)
    assert torch.equal(imported.patch_embedding_mlp.weight, wan.patch_embedding.weight.reshape(imported.config.video_width, -1))


def test_a_run_starts_from_an_imported_checkpoint(tmp_path):
    from lbva.training.config import TrainConfig
    from lbva.training.config_io import load_config
    from lbva.training.trainer import train

    from helpers import prepared_demo

    dataset = prepared_demo(tmp_path / "data", num_episodes=2, frames_per_episode=41, image_size=64)
    model = LingBotVA(get_preset("tiny-mot"))
    checkpoint = write_weights_checkpoint(model, tmp_path / "ckpt", "tiny-mot", "test")
    config = load_config(TrainConfig, overrides=[
        "model.preset=tiny-mot", f"data.prepared=['{dataset}']", f"run.output_dir={tmp_path}",
        "data.text_tokens=8", "data.window_frames=4", "data.token_budget=256", "data.pad_multiple=32",
        "run.steps=1", f"checkpoint.resume={checkpoint}", "optim.lr=1e-12", "optim.warmup_steps=0",
    ])
    run = train(config, Console(quiet=True))
    trained = load_model(run.run_dir / "checkpoints" / "step_00000001")
    assert torch.allclose(trained.blocks[0].attn1.to_q.weight, model.blocks[0].attn1.to_q.weight, atol=1e-6)


def test_importing_a_folder_of_another_kind_is_refused(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(WeightImportError, match="neither"):
        load_lingbot_folder(tmp_path)


def test_inspect_lists_tensors_step_and_parameter_count(tmp_path):
    model = LingBotVA(get_preset("tiny-shared"))
    checkpoint = write_weights_checkpoint(model, tmp_path / "ckpt", "tiny-shared", "test")
    text = "\n".join(inspect_checkpoint(checkpoint))
    assert "step 0" in text and "train.model.proj_out.weight" in text
    assert f"model parameters: {sum(p.numel() for p in model.parameters()):,}" in text

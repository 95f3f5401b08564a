"""A tiny random diffusers WanTransformer3DModel, saved and imported into our video stream, gives
the same output on the same input: weight mapping, RoPE and block math proven together."""

import pytest
import torch

from lbva.models.attention import AttentionKernels, sdpa_kernel
from lbva.models.config import get_preset
from lbva.models.mot import LingBotVA, ModelInputs
from lbva.models.patching import patchify, unpatchify, video_positions
from lbva.models.weights import WeightImportError, import_wan_video_stream, init_action_stream_from_video

diffusers = pytest.importorskip("diffusers")


def _tiny_wan(config, seed=0):
    torch.manual_seed(seed)
    wan = diffusers.WanTransformer3DModel(
        patch_size=config.patch_size, num_attention_heads=config.num_heads, attention_head_dim=config.head_dim,
        in_channels=config.in_channels, out_channels=config.in_channels, text_dim=config.text_dim,
        freq_dim=config.freq_dim, ffn_dim=config.video_ffn_dim, num_layers=config.num_layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=config.eps,
    ).eval()
    with torch.no_grad():  # move every weight off its init so no mapping error can hide behind zeros
        for param in wan.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return wan


def _video_only_inputs(latents, timesteps_per_token, text, config):
    _, _, f, h, w = latents.shape
    grid = (f, h // config.patch_size[1], w // config.patch_size[2])
    tokens = patchify(latents, config.patch_size)
    return grid, ModelInputs(
        video_tokens=tokens, video_timesteps=timesteps_per_token, video_positions=video_positions(*grid)[None],
        action_tokens=torch.zeros(1, 0, config.action_dim), action_timesteps=torch.zeros(1, 0),
        action_positions=torch.zeros(1, 0, 3), text=text,
    )


@pytest.mark.parametrize("preset", ["tiny-shared", "tiny-mot"])
def test_imported_video_stream_matches_diffusers(tmp_path, preset):
    config = get_preset(preset)
    wan = _tiny_wan(config)
    wan.save_pretrained(tmp_path / "transformer")
    model = LingBotVA(config).eval()
    import_wan_video_stream(model, tmp_path)

    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, config.in_channels, 3, 8, 6, generator=generator)
    text = torch.randn(1, 7, config.text_dim, generator=generator)
    tokens_per_frame = 4 * 3
    # Wan2.2 TI2V per-token timesteps: a different level for each latent frame.
    timesteps = torch.tensor([0.0, 400.0, 950.0]).repeat_interleave(tokens_per_frame)[None]
    with torch.no_grad():
        reference = wan(latents, timesteps, text).sample
        grid, inputs = _video_only_inputs(latents, timesteps, text, config)
        video, _ = model(inputs, AttentionKernels(sdpa_kernel(None), sdpa_kernel(None)))
    ours = unpatchify(video, grid, config.patch_size)
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0)


def test_import_rejects_a_checkpoint_of_another_shape(tmp_path):
    config = get_preset("tiny-shared")
    other = _tiny_wan(get_preset("tiny-shared", num_layers=3))
    other.save_pretrained(tmp_path)
    with pytest.raises(WeightImportError, match="num_layers=3"):
        import_wan_video_stream(LingBotVA(config), tmp_path)


def test_import_rejects_a_folder_without_config(tmp_path):
    with pytest.raises(WeightImportError, match="config.json"):
        import_wan_video_stream(LingBotVA(get_preset("tiny-shared")), tmp_path)


def test_shared_import_copies_the_time_embedder_into_the_action_one(tmp_path):
    config = get_preset("tiny-shared")
    _tiny_wan(config).save_pretrained(tmp_path)
    model = LingBotVA(config)
    import_wan_video_stream(model, tmp_path)
    for (name, video), (_, action) in zip(
        model.condition_embedder.named_parameters(), model.condition_embedder_action.named_parameters()
    ):
        assert torch.equal(video, action), name

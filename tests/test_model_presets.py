"""Presets have the parameter counts the spec fixes; forward shapes hold for every layout."""

import pytest
import torch

from lbva.models.attention import AttentionKernels, sdpa_kernel
from lbva.models.config import PRESETS, get_preset
from lbva.models.info import build_on_meta, parameter_counts
from lbva.models.mot import LingBotVA, ModelInputs
from lbva.models.patching import action_positions, input_to_output_order, video_positions


def test_shared_preset_has_the_released_parameter_count():
    assert parameter_counts(build_on_meta(get_preset("lingbot-va-shared")))["total"] == 5_088_872_670


def test_mot_preset_total_is_between_5_30_and_5_45_billion():
    total = parameter_counts(build_on_meta(get_preset("lingbot-va-5b-mot")))["total"]
    assert 5.30e9 <= total <= 5.45e9


def test_mot_video_stream_is_the_wan22_5b_shape():
    counts = parameter_counts(build_on_meta(get_preset("lingbot-va-5b-mot")))
    assert counts["video: blocks"] == 30 * 163_656_704


def test_shared_layout_uses_the_released_parameter_names():
    names = set(dict(build_on_meta(get_preset("lingbot-va-shared")).named_parameters()))
    for expected in (
        "patch_embedding_mlp.weight", "action_embedder.weight", "condition_embedder.time_proj.weight",
        "condition_embedder_action.text_embedder.linear_2.bias", "blocks.29.attn1.norm_q.weight",
        "blocks.0.attn2.to_out.0.weight", "blocks.0.ffn.net.0.proj.weight", "blocks.0.ffn.net.2.weight",
        "blocks.0.norm2.weight", "blocks.0.scale_shift_table", "proj_out.weight", "action_proj_out.weight",
        "scale_shift_table",
    ):
        assert expected in names
    assert not any(name.startswith("action_blocks") for name in names)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(KeyError, match="lingbot-va-shared"):
        get_preset("nope")


@pytest.mark.parametrize("preset", ["tiny-mot", "tiny-shared"])
def test_forward_returns_one_prediction_per_token(preset):
    config = get_preset(preset)
    model = LingBotVA(config)
    frames, h, w, n = 2, 3, 2, 4
    lv, la = frames * h * w, frames * n
    inputs = ModelInputs(
        video_tokens=torch.randn(1, lv, config.video_token_dim),
        video_timesteps=torch.rand(1, lv) * 1000,
        video_positions=video_positions(frames, h, w)[None],
        action_tokens=torch.randn(1, la, config.action_dim),
        action_timesteps=torch.rand(1, la) * 1000,
        action_positions=action_positions(frames, n)[None],
        text=torch.randn(1, 5, config.text_dim),
    )
    video, action = model(inputs, AttentionKernels(sdpa_kernel(None), sdpa_kernel(None)))
    assert video.shape == (1, lv, config.video_token_dim)
    assert action.shape == (1, la, config.action_dim)
    assert torch.isfinite(video).all() and torch.isfinite(action).all()


def test_every_preset_builds():
    for name in PRESETS:
        assert parameter_counts(build_on_meta(get_preset(name)))["total"] > 0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_wide_enough_for_its_video_tokens(name):
    config = PRESETS[name]
    assert config.video_width >= config.video_token_dim


def test_a_video_stream_narrower_than_its_tokens_is_refused_with_the_numbers():
    # 4 x 32 = 128 < 48 x 4 = 192: the output layer's rank would leave a third of the velocity
    # unreachable, a floor of ~0.34 under the video loss (the old demo preset's plateau).
    with pytest.raises(ValueError, match=r"4 x 32 = 128 is narrower than a video token .* 192"):
        get_preset("demo-mot", head_dim=32)


def test_an_action_output_path_narrower_than_the_action_space_is_refused():
    with pytest.raises(ValueError, match="action_io_hidden"):
        get_preset("tiny-mot", action_io_hidden=16)


@pytest.mark.parametrize("preset", ["demo-mot", "tiny-shared"])
def test_an_untrained_model_hands_its_pure_noise_input_back_as_the_velocity(preset):
    """The from-scratch head passes the noisy input through (LingBotVA.init_weights): at sigma 1
    the velocity noise - x0 is the input up to the data, which a head learnt from zero took the
    demo longer than its whole run to find. The unexplained share of the noise stays small."""
    torch.manual_seed(0)
    config = get_preset(preset)
    model = LingBotVA(config)
    frames, h, w, n = 2, 4, 4, 4
    lv, la = frames * h * w, frames * n
    noise = torch.randn(1, lv, config.video_token_dim)
    inputs = ModelInputs(
        video_tokens=noise, video_timesteps=torch.full((1, lv), 1000.0),
        video_positions=video_positions(frames, h, w)[None],
        action_tokens=torch.randn(1, la, config.action_dim), action_timesteps=torch.full((1, la), 1000.0),
        action_positions=action_positions(frames, n)[None], text=torch.randn(1, 5, config.text_dim),
    )
    with torch.no_grad():
        video, _ = model(inputs, AttentionKernels(sdpa_kernel(None), sdpa_kernel(None)))
    target = input_to_output_order(noise, config.patch_size)
    alpha = float((video * target).sum() / (target * target).sum())  # the noise's share in the prediction
    residual = float(((video - alpha * target) ** 2).mean())
    assert 0.5 < alpha < 1.5 and residual < 0.5, (alpha, residual)


@pytest.mark.parametrize("preset", ["demo-mot", "tiny-mot"])
def test_an_untrained_models_position_heads_attend_to_their_own_row_and_column(preset):
    """LingBotVA.init_weights (init_position_heads): before training, half the heads of every video
    self-attention prefer the tokens in the query's own (row, col) of the other frames (their most
    attended key sits there several times as often as chance, 1 in 16); the other heads do not
    care where a key sits."""
    torch.manual_seed(0)
    config = get_preset(preset)
    model = LingBotVA(config)
    frames, h, w = 4, 4, 4
    positions = video_positions(frames, h, w)[None]
    cos, sin = model.rope(positions.expand(8, -1, -1))
    x = torch.randn(8, frames * h * w, config.video_width)
    cells = torch.arange(h * w).repeat(frames)
    other_frame = torch.arange(frames).repeat_interleave(h * w)[:, None] != torch.arange(frames).repeat_interleave(h * w)
    for block in model.blocks:
        with torch.no_grad():
            q, k, _ = block.attn1.project(torch.nn.functional.layer_norm(x, x.shape[-1:]), (cos, sin))
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k).masked_fill(~other_frame, float("-inf"))
        same_cell = (cells[logits.argmax(-1)] == cells).float().mean((0, 2))  # per head
        position_heads = max(1, config.num_heads // 2)
        chance = 1 / (h * w)
        assert bool((same_cell[:position_heads] > 3 * chance).all()), same_cell
        assert bool((same_cell[position_heads:] < 2 * chance).all()), same_cell

"""Action-stream "copy init": interpolate the video weights to the action shapes, scale by
sqrt(d_in_video / d_in_action) (spec 1.3)."""

import math

import torch

from lbva.models.config import get_preset
from lbva.models.mot import LingBotVA
from lbva.models.weights import init_action_stream_from_video, resize_like


def test_resize_to_the_same_shape_is_the_identity():
    source = torch.randn(6, 5)
    assert torch.equal(resize_like(source, source.shape), source)


def test_resize_keeps_the_end_points_of_a_resized_output_axis():
    source = torch.randn(12, 5)
    resized = resize_like(source, torch.Size([4, 5]))
    assert torch.allclose(resized[0], source[0]) and torch.allclose(resized[-1], source[-1])


def test_shrinking_the_input_axis_scales_by_the_square_root_of_the_ratio():
    resized = resize_like(torch.full((3, 64), 0.5), torch.Size([3, 16]), last_axis_is_fan_in=True)
    assert torch.allclose(resized, torch.full((3, 16), 0.5 * math.sqrt(64 / 16)))


def test_resizing_a_bias_does_not_scale_it():
    resized = resize_like(torch.full((64,), 0.5), torch.Size([16]))
    assert torch.allclose(resized, torch.full((16,), 0.5))


def test_linear_interpolation_of_a_ramp_stays_a_ramp():
    ramp = torch.linspace(0, 1, 9)[:, None].expand(9, 2)
    resized = resize_like(ramp, torch.Size([5, 2]))
    assert torch.allclose(resized[:, 0], torch.linspace(0, 1, 5))


def test_init_copies_norms_and_scales_input_projections():
    config = get_preset("tiny-mot")
    model = LingBotVA(config)
    init_action_stream_from_video(model)
    video, action = model.blocks[0], model.action_blocks[0]
    assert torch.equal(action.attn1.norm_q.weight, video.attn1.norm_q.weight)
    ratio = math.sqrt(config.video_width / config.action_width)
    # to_q: [inner, 64] -> [inner, 16]; first and last input columns survive, scaled.
    assert torch.allclose(action.attn1.to_q.weight[:, 0], video.attn1.to_q.weight[:, 0] * ratio, atol=1e-6)
    assert torch.allclose(action.attn1.to_q.weight[:, -1], video.attn1.to_q.weight[:, -1] * ratio, atol=1e-6)


def test_time_projection_is_resized_per_modulation_chunk():
    config = get_preset("tiny-mot")
    model = LingBotVA(config)
    with torch.no_grad():
        chunks = torch.arange(6, dtype=torch.float32).repeat_interleave(config.video_width)
        model.condition_embedder.time_proj.bias.copy_(chunks)
    init_action_stream_from_video(model)
    action_bias = model.condition_embedder_action.time_proj.bias.unflatten(0, (6, -1))
    for chunk in range(6):
        assert torch.allclose(action_bias[chunk], torch.full_like(action_bias[chunk], float(chunk)))


def test_init_leaves_the_action_encoder_and_decoder_untouched():
    model = LingBotVA(get_preset("tiny-mot"))
    before = model.action_embedder.linear_1.weight.clone()
    init_action_stream_from_video(model)
    assert torch.equal(model.action_embedder.linear_1.weight, before)

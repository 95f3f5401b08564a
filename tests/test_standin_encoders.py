"""The stand-in video and text encoders keep the real encoders' shapes and conventions."""

import numpy as np
import pytest
import torch

from lbva.errors import UserError
from lbva.models.standin_encoders import StandInTextEncoder, StandInVideoEncoder


def random_video(frames=9, height=64, width=96, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def smooth_image(height=64, width=64):
    ys, xs = np.mgrid[0:height, 0:width] / 64.0
    image = np.stack([128 + 100 * np.sin(2 * xs), 128 + 100 * np.cos(3 * ys), 128 + 60 * np.sin(2 * (xs + ys))], -1)
    return image.round().astype(np.uint8)


def test_video_latents_have_48_channels_1_plus_4k_frames_and_16x_smaller_grid():
    latents = StandInVideoEncoder().encode(random_video(frames=9, height=64, width=96))
    assert latents.shape == (48, 3, 4, 6)
    assert latents.dtype == torch.float32


def test_frame_count_not_1_plus_4k_is_a_user_error_naming_it():
    with pytest.raises(UserError, match="1 \\+ 4k frames, got 8"):
        StandInVideoEncoder().encode(random_video(frames=8))


def test_size_not_a_multiple_of_32_is_a_user_error_naming_it():
    with pytest.raises(UserError, match="multiples of 32, got 48x64"):
        StandInVideoEncoder().encode(random_video(frames=5, height=48, width=64))


def test_first_frame_is_encoded_alone():
    video = random_video(frames=5)
    changed = video.copy()
    changed[1:] = 255 - changed[1:]
    encoder = StandInVideoEncoder()
    torch.testing.assert_close(encoder.encode(video)[:, 0], encoder.encode(changed)[:, 0])
    assert not torch.allclose(encoder.encode(video)[:, 1], encoder.encode(changed)[:, 1])


def test_each_later_latent_frame_covers_its_own_four_frames():
    video = random_video(frames=9)
    changed = video.copy()
    changed[3] = 0  # frame 3 belongs to latent frame 1 (frames 1..4)
    encoder = StandInVideoEncoder()
    before, after = encoder.encode(video), encoder.encode(changed)
    assert not torch.allclose(before[:, 1], after[:, 1])
    torch.testing.assert_close(before[:, [0, 2]], after[:, [0, 2]])


def test_channel_order_is_colour_then_row_then_column_of_the_4x4_cell():
    video = np.zeros((1, 32, 32, 3), np.uint8)
    video[0, 4:8, 8:12, 1] = 255  # green, pooled cell row 1, column 2 of the first 16x16 block
    latents = StandInVideoEncoder().encode(video)
    lit = (latents[:, 0, 0, 0] > latents.min()).nonzero().flatten().tolist()
    assert lit == [1 * 16 + 1 * 4 + 2]


def test_latents_have_roughly_unit_scale():
    latents = StandInVideoEncoder().encode(random_video(frames=5, height=64, width=64))
    assert 0.2 < latents.std().item() < 2.0


def test_decode_of_encode_is_close_on_a_smooth_static_video():
    image = smooth_image()
    encoder = StandInVideoEncoder()
    decoded = encoder.decode(encoder.encode(np.repeat(image[None], 5, axis=0)))
    assert decoded.shape == (2, 64, 64, 3) and decoded.dtype == torch.uint8
    assert (decoded.int() - torch.from_numpy(image).int()).abs().float().mean() < 4.0


def test_text_encoding_is_deterministic_across_instances():
    first = StandInTextEncoder(text_dim=32, max_tokens=8).encode("push the red block to the left")
    second = StandInTextEncoder(text_dim=32, max_tokens=8).encode("push the red block to the left")
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_text_encoding_is_case_insensitive_and_depends_on_the_words():
    encoder = StandInTextEncoder(text_dim=32, max_tokens=8)
    torch.testing.assert_close(encoder.encode("Push the RED block"), encoder.encode("push the red block"))
    assert not torch.allclose(encoder.encode("push the red block"), encoder.encode("push the blue block"))


def test_different_seeds_give_different_tables():
    text = "push the red block"
    first, second = StandInTextEncoder(32, 8, seed=0).encode(text), StandInTextEncoder(32, 8, seed=1).encode(text)
    assert not torch.allclose(first, second)


def test_rows_past_the_prompt_length_are_zero():
    embedding = StandInTextEncoder(text_dim=32, max_tokens=10).encode("push the red block")
    assert embedding.shape == (10, 32)
    assert (embedding[:4].abs().sum(-1) > 0).all()
    assert (embedding[4:] == 0).all()


def test_empty_text_encodes_to_zeros():
    embedding = StandInTextEncoder(text_dim=16, max_tokens=6).encode("")
    assert embedding.shape == (6, 16) and (embedding == 0).all()


def test_long_text_is_truncated_to_max_tokens():
    encoder = StandInTextEncoder(text_dim=16, max_tokens=3)
    torch.testing.assert_close(encoder.encode("one two three four five"), encoder.encode("one two three"))

"""Robot inputs -> model inputs: streaming camera encoding, prompts, the action codec."""

import numpy as np
import pytest
import torch

from inference_fixtures import CAMERAS, CHANNELS, IMAGE, TEXT_TOKENS, observation, stats, tiled_latents
from lbva.inference.observations import ActionCodec, CameraLayout, ObservationEncoder, PromptEncoder
from lbva.models.encoders import EncoderChoice, WanVideoEncoder
from lbva.models.standin_encoders import StandInTextEncoder
from lbva.models.tiling import make_tiling, resize_frames

LAYOUT = CameraLayout(CAMERAS, make_tiling("side_by_side", 2, [IMAGE], [IMAGE]))


def test_chunk_by_chunk_encoding_equals_encoding_the_whole_clip():
    rng = np.random.default_rng(0)
    frames = [observation(rng) for _ in range(13)]
    encoder = ObservationEncoder(LAYOUT, EncoderChoice("standin"), "cpu")
    streamed = torch.cat([encoder.start(frames[0]), encoder.extend(frames[1:5]), encoder.extend(frames[5:])], dim=1)
    torch.testing.assert_close(streamed, tiled_latents(frames))


def test_camera_images_of_another_size_are_resized_first():
    rng = np.random.default_rng(1)
    big = {key: rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for key in CAMERAS}
    latents = ObservationEncoder(LAYOUT, EncoderChoice("standin"), "cpu").start(big)
    assert latents.shape == (48, 1, 4, 8)


def test_the_wan_vae_streams_like_one_whole_clip_encode(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
        scale_factor_spatial=16, scale_factor_temporal=4, latents_mean=[0.1] * 48, latents_std=[2.0] * 48)
    vae.save_pretrained(tmp_path / "vae")
    choice = EncoderChoice("real", vae=tmp_path / "vae", text_encoder=tmp_path)
    rng = np.random.default_rng(2)
    frames = [{"cam": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)} for _ in range(9)]
    encoder = ObservationEncoder(CameraLayout(("cam",), make_tiling("side_by_side", 1, [32], [32])), choice, "cpu")
    streamed = torch.cat([encoder.start(frames[0]), encoder.extend(frames[1:5]), encoder.extend(frames[5:])], dim=1)
    clip = resize_frames(np.stack([f["cam"] for f in frames]), (32, 32))[None]
    torch.testing.assert_close(streamed, WanVideoEncoder(tmp_path / "vae", "cpu").encode(clip)[0], rtol=1e-4, atol=1e-4)


def test_prompts_are_zero_padded_to_the_trained_length():
    encoded = PromptEncoder(EncoderChoice("standin", standin_text_dim=16), TEXT_TOKENS, "cpu").encode(["push it", ""])
    assert encoded.shape == (2, TEXT_TOKENS, 16)
    torch.testing.assert_close(encoded[0], StandInTextEncoder(16, TEXT_TOKENS).encode("push it"))
    assert not encoded[1].any()


def test_actions_round_trip_through_the_normalised_30d_layout():
    codec = ActionCodec(CHANNELS, stats())
    rng = np.random.default_rng(3)
    executed = np.stack([rng.uniform(-0.5, 0.5, (2, 4)), rng.uniform(0.0, 2.0, (2, 4))])  # [C, K, N] within q01..q99
    tokens = codec.normalize(executed)
    assert tokens.shape == (8, 30)
    assert not tokens[:, 2:].any()  # unused slots stay zero
    assert tokens.abs().max() <= 1.0 + 1e-6
    np.testing.assert_allclose(codec.denormalize(tokens, 2, 4), executed, atol=1e-5)

"""`prepare` with the real encoder classes (a tiny random Wan VAE and umT5) on a three-camera LeRobot v3.0
dataset in the RoboTwin T-shape: latents are the VAE's normalised mean, texts are umT5's outputs."""

import json

import numpy as np

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file
from transformers import AutoTokenizer, UMT5EncoderModel

from lbva.errors import UserError
from lbva.models.encoders import EncoderChoice
from lbva.training.data.format import EMPTY_TEXT_ID
from lbva.training.data.lerobot import LeRobotDataset
from lbva.training.data.prepare import PrepareConfig, prepare
from lbva.training.data.tiny_models import write_tiny_wan_vae

CAMERAS = ["observation.images.cam_high", "observation.images.cam_left_wrist", "observation.images.cam_right_wrist"]


@pytest.fixture(scope="module")
def prepared(v3_dataset, tiny_vae, tiny_text_encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("real")
    report = prepare(PrepareConfig(
        src=v3_dataset, out=out, target_fps=10, action_channels=[0, 1], cameras=CAMERAS, layout="robotwin_tshape",
        heights=[64], widths=[64], encoders=EncoderChoice("real", tiny_vae, tiny_text_encoder)))
    return out, report


def vae_latents(vae: AutoencoderKLWan, frames, size: int) -> torch.Tensor:
    """The reference computation: resize, scale to [-1, 1], posterior mean, per-channel normalisation."""
    pixels = F.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size=(size, size),
                           mode="bilinear", align_corners=False) / 127.5 - 1.0
    with torch.no_grad():
        mean = vae.encode(pixels.permute(1, 0, 2, 3)[None]).latent_dist.mean[0]
    shift = torch.tensor(vae.config.latents_mean).view(-1, 1, 1, 1)
    scale = torch.tensor(vae.config.latents_std).view(-1, 1, 1, 1)
    return (mean - shift) / scale


def test_every_episode_is_prepared(prepared, shards_of):
    out, report = prepared
    assert (report.samples_written, report.errors) == (5, [])
    assert sorted(shards_of(out, "robot")) == [f"robot__e{i:06d}__s000" for i in range(5)]


def test_latents_are_the_normalised_vae_mean_tiled_in_the_t_shape(prepared, shards_of, v3_dataset, tiny_vae):
    latents = torch.from_numpy(shards_of(prepared[0], "robot")["robot__e000002__s000"][0]).float()
    assert latents.shape == (48, 3, 4 + 2, 4)  # wrists 2x2 each side by side, above the 4x4 head
    frames = LeRobotDataset(v3_dataset).read_episode(2, frame_indices=range(4, 21, 2)).frames  # segment [4, 21)
    vae = AutoencoderKLWan.from_pretrained(tiny_vae).eval()
    head, left, right = (vae_latents(vae, frames[key], size) for key, size in zip(CAMERAS, (64, 32, 32)))
    for part, expected in ((latents[:, :, 2:], head), (latents[:, :, :2, :2], left), (latents[:, :, :2, 2:], right)):
        torch.testing.assert_close(part, expected, atol=2e-3, rtol=2e-3)


def test_text_embeddings_equal_umt5_outputs_zero_past_the_true_length(prepared, shards_of, tiny_text_encoder):
    out = prepared[0]
    stored = load_file(out / "texts" / "robot" / "t000.safetensors")
    metas = [meta for *_, meta in shards_of(out, "robot").values()]
    texts = {meta.text_id: meta.text for meta in metas} | {EMPTY_TEXT_ID: ""}
    assert set(stored) == set(texts)
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_encoder)
    model = UMT5EncoderModel.from_pretrained(tiny_text_encoder).eval()
    for key, text in texts.items():
        batch = tokenizer([text], max_length=512, padding="max_length", truncation=True, return_tensors="pt")
        with torch.no_grad():
            expected = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state[0]
        expected = expected * batch.attention_mask[0, :, None]
        length = int(batch.attention_mask.sum())
        padded = torch.zeros(512, 32)
        padded[:len(stored[key])] = stored[key].float()
        assert len(stored[key]) == length == len(text.split()) + 1  # words and </s>
        torch.testing.assert_close(padded, expected.bfloat16().float())


def test_card_records_the_encoders_their_configs_and_the_layout(prepared, tiny_vae, tiny_text_encoder):
    card = json.loads((prepared[0] / "card.json").read_text())
    video, text = card["encoders"]["video"], card["encoders"]["text"]
    assert card["encoders"]["kind"] == "real"
    assert video["path"] == str(tiny_vae.resolve()) and video["config"]["z_dim"] == video["z_dim"] == 48
    assert (video["spatial_factor"], video["temporal_factor"]) == (16, 4)
    assert len(video["config"]["latents_mean"]) == 48
    assert text["path"] == str(tiny_text_encoder.resolve()) and text["text_dim"] == 32
    assert text["max_length"] == 512 and text["config"]["num_layers"] == 2
    entry = card["sources"]["robot"]
    assert entry["tiling"] == {"layout": "robotwin_tshape", "camera_sizes": [[64, 64], [32, 32], [32, 32]],
                               "latent_size": [6, 4]}
    assert entry["cameras"] == CAMERAS and entry["lerobot_version"] == "v3.0"
    assert entry["tokens_per_frame"] == 3 * 2 + 8


def test_another_source_with_other_encoders_is_refused(prepared, v21_dataset, run_standin):
    with pytest.raises(UserError, match="prepared with other encoders"):
        run_standin(v21_dataset, prepared[0])


def test_a_tiny_vae_calibrated_on_clips_writes_unit_scale_latents(tmp_path):
    # The real Wan2.2 VAE's latents_mean/std are data statistics, so its normalised latents are
    # near unit scale; a random tiny VAE calibrated on the clips it will encode must be too.
    from lbva.models.encoders import WanVideoEncoder
    from lbva.training.data.demo_world import simulate_episode

    rng = np.random.default_rng(3)
    clips = [simulate_episode(rng, 9, image_size=64).frames for _ in range(4)]
    folder = write_tiny_wan_vae(tmp_path / "vae", calibration_clips=clips)
    encoder = WanVideoEncoder(folder, "cpu")
    pixels = torch.stack([torch.from_numpy(c).float().div(127.5).sub(1).permute(3, 0, 1, 2) for c in clips])
    latents = encoder.encode(pixels).transpose(0, 1).flatten(1)  # [48, N]
    assert latents.mean(1).abs().max() < 1e-3
    assert torch.allclose(latents.std(1), torch.ones(48), atol=1e-3)

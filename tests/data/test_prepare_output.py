"""`prepare` output on a LeRobot v2.1 dataset with stand-in encoders: shards, index, texts, stats, card."""

import json

import numpy as np
import pytest
import torch
import webdataset as wds
from safetensors.torch import load_file

from lbva.errors import UserError
from lbva.models.action_space import ACTION_DIM
from lbva.models.standin_encoders import StandInTextEncoder, StandInVideoEncoder
from lbva.training.data.format import EMPTY_TEXT_ID, FORMAT_VERSION, text_id
from lbva.training.data.lerobot import LeRobotDataset

CHANNELS = [3, 28]  # the demo's (dx, dy) put into two arbitrary slots of the 30-d layout
KEYS = ["demo__e000000__s000", "demo__e000001__s000", "demo__e000001__s001", "demo__e000002__s000",
        "demo__e000003__s000"]


@pytest.fixture(scope="module")
def prepared(v21_dataset, tmp_path_factory, run_standin):
    out = tmp_path_factory.mktemp("prepared")
    report = run_standin(v21_dataset, out, action_channels=CHANNELS)
    return out, report


def test_every_episode_and_segment_long_enough_becomes_a_sample(prepared, shards_of):
    out, report = prepared
    assert sorted(shards_of(out, "demo")) == KEYS
    assert (report.samples_written, report.too_short, report.errors) == (5, 1, [])


def test_members_have_the_format_shapes_and_dtypes(prepared, shards_of):
    latents, actions, mask, meta = shards_of(prepared[0], "demo")["demo__e000000__s000"]
    # 21 frames at 20 fps -> every 2nd frame, 9 kept -> 3 latent frames; 64 px -> 4x4; N = 4 * 2.
    assert (latents.dtype, latents.shape) == (np.float16, (48, 3, 4, 4))
    assert (actions.dtype, actions.shape) == (np.float32, (ACTION_DIM, 3, 8))
    assert (mask.dtype, mask.shape) == (bool, (ACTION_DIM,))
    assert (meta.fps, meta.target_fps, meta.latent_frames, meta.tokens_per_frame) == (20, 10, 3, 2 * 2 + 8)


def test_segment_text_replaces_the_task_text(prepared, shards_of, v21_dataset):
    samples = shards_of(prepared[0], "demo")
    first, second = samples["demo__e000001__s000"][3], samples["demo__e000001__s001"][3]
    assert (first.text, first.start_frame, first.end_frame) == ("approach the block", 0, 13)
    assert (second.text, second.start_frame, second.end_frame) == ("push it to the left", 8, 21)
    assert samples["demo__e000000__s000"][3].text == LeRobotDataset(v21_dataset).episode_task(0)
    assert first.text_id == text_id("approach the block")


def test_latents_encode_the_frames_sampled_from_the_segment_start(prepared, shards_of, v21_dataset):
    latents = shards_of(prepared[0], "demo")["demo__e000001__s001"][0]  # frames 8, 10, ..., 16
    frames = LeRobotDataset(v21_dataset).read_episode(1, frame_indices=range(8, 17, 2)).frames
    expected = StandInVideoEncoder().encode(frames["observation.images.top"])
    torch.testing.assert_close(torch.from_numpy(latents).float(), expected, atol=2e-3, rtol=2e-3)


def test_actions_are_mapped_aligned_and_quantile_normalised(prepared, shards_of, v21_dataset):
    dataset = LeRobotDataset(v21_dataset)
    raw = np.concatenate([dataset.read_actions(i) for i in dataset.episode_indices])
    q01, q99 = np.quantile(raw, 0.01, axis=0), np.quantile(raw, 0.99, axis=0)
    _, actions, mask, _ = shards_of(prepared[0], "demo")["demo__e000001__s001"]
    segment = dataset.read_actions(1)[8:16]  # group 1 holds the 8 steps from the segment's first frame
    expected = np.clip((segment - q01) / (q99 - q01 + 1e-6) * 2 - 1, -1.5, 1.5)
    np.testing.assert_allclose(actions[CHANNELS, 1].T, expected, atol=1e-5)
    assert (actions[:, 0] == 0).all()
    assert mask.nonzero()[0].tolist() == CHANNELS
    assert (actions[~mask] == 0).all()


def test_index_lines_match_the_shard_contents(prepared, shards_of, index_of):
    out = prepared[0]
    samples = shards_of(out, "demo")
    lines = index_of(out, "demo")
    assert sorted(line["key"] for line in lines) == KEYS
    for line in lines:
        meta = samples[line["key"]][3]
        assert (line["source"], line["episode"], line["frames"]) == ("demo", meta.episode, meta.latent_frames)
        assert line["tokens"] == meta.latent_frames * meta.tokens_per_frame
        shard_keys = {m["__key__"] for m in wds.WebDataset(
            str(out / line["shard"]), shardshuffle=False, empty_check=False)}
        assert line["key"] in shard_keys


def test_texts_are_stored_once_at_their_true_length_with_the_empty_text(prepared, shards_of):
    out = prepared[0]
    texts = {meta.text for *_, meta in shards_of(out, "demo").values()}
    stored = load_file(out / "texts" / "demo" / "t000.safetensors")
    assert set(stored) == {text_id(t) for t in texts} | {EMPTY_TEXT_ID}
    reference = StandInTextEncoder(text_dim=16, max_tokens=512)
    for text in texts:
        embedding = stored[text_id(text)]
        words = len(text.split())
        assert embedding.shape == (words, 16)
        torch.testing.assert_close(embedding.float(), reference.encode(text)[:words].bfloat16().float())
    assert stored[EMPTY_TEXT_ID].shape == (0, 16)


def test_stats_file_and_card_describe_the_source(prepared):
    out = prepared[0]
    stats = json.loads((out / "stats" / "demo.json").read_text())
    card = json.loads((out / "card.json").read_text())
    entry = card["sources"]["demo"]
    assert card["format_version"] == FORMAT_VERSION
    assert card["encoders"]["kind"] == "standin" and card["encoders"]["text"]["text_dim"] == 16
    assert entry["stats"] == stats and len(stats["q01"]) == ACTION_DIM
    assert (entry["target_fps"], entry["frame_stride"], entry["actions_per_frame"]) == (10, 2, 8)
    assert entry["tiling"] == {"layout": "side_by_side", "camera_sizes": [[64, 64]], "latent_size": [4, 4]}
    assert entry["action_channels"] == CHANNELS and entry["lerobot_version"] == "v2.1"
    assert {"torch", "webdataset", "diffusers", "transformers"} <= set(card["versions"])


def test_a_rerun_with_other_settings_is_refused(prepared, v21_dataset, run_standin):
    with pytest.raises(UserError, match=r"source 'demo' was prepared with other settings \(.*target_fps"):
        run_standin(v21_dataset, prepared[0], action_channels=CHANNELS, target_fps=5)


def test_video_only_source_has_zero_actions_and_an_all_false_mask(tmp_path, make_v3, camera_episode, run_standin,
                                                                   shards_of):
    src = make_v3(tmp_path / "clips", [camera_episode(i, 13, with_actions=False) for i in range(2)])
    report = run_standin(src, tmp_path / "out", action_channels=[], cameras=["observation.images.cam_high"])
    samples = shards_of(tmp_path / "out", "clips")
    assert report.samples_written == len(samples) == 2
    for _, actions, mask, meta in samples.values():
        assert not mask.any() and not actions.any()
        assert actions.shape == (ACTION_DIM, meta.latent_frames, 8)
    stats = json.loads((tmp_path / "out" / "stats" / "clips.json").read_text())
    assert not any(stats["q01"]) and not any(stats["q99"])


def test_action_channels_for_a_video_only_source_are_refused(tmp_path, make_v3, camera_episode, run_standin):
    src = make_v3(tmp_path / "clips", [camera_episode(0, 13, with_actions=False)])
    with pytest.raises(UserError, match="has no 'action' feature"):
        run_standin(src, tmp_path / "out", action_channels=[0])

"""LeRobot dataset -> EpisodeSamples: frame sampling, action alignment (spec 2.1), 30-d mapping, normalisation."""

import numpy as np
import pytest
import torch

from lbva.training.demo_dataset import ActionStats, align_actions, build_samples
from lbva.training.demo_world import DemoEpisode, LeRobotWriter
from lbva.errors import UserError
from lbva.training.lerobot_v21 import LeRobotDataset
from lbva.training.samples import ACTION_DIM
from lbva.training.standin_encoders import StandInTextEncoder, StandInVideoEncoder

TASK = "push the red block to the left"


def step_episode(num_frames: int, outlier: float | None = None) -> DemoEpisode:
    """An episode whose action at raw step t is (t, -t), so aligned groups reveal which steps they hold."""
    steps = np.arange(num_frames, dtype=np.float32)
    actions = np.stack([steps, -steps], -1)
    if outlier is not None:
        actions[num_frames // 2, 0] = outlier
    frames = np.random.default_rng(num_frames).integers(0, 256, (num_frames, 64, 64, 3), dtype=np.uint8)
    return DemoEpisode(frames, np.zeros((num_frames, 2), np.float32), actions, TASK,
                       np.zeros((num_frames, 0, 2), np.float32), [])


def write_dataset(root, episodes, fps=20):
    writer = LeRobotWriter(root, fps=fps, image_size=64)
    for episode in episodes:
        writer.add_episode(episode)
    return writer.finish()


def build(root, target_fps=10, channels=(0, 1), **kwargs):
    return build_samples(root, target_fps=target_fps, video_encoder=StandInVideoEncoder(),
                         text_encoder=StandInTextEncoder(text_dim=16, max_tokens=8), action_channels=list(channels),
                         **kwargs)


def denormalize(actions: torch.Tensor, stats: ActionStats, slot: int) -> np.ndarray:
    """Invert the quantile normalisation of one slot: [F, N] raw values."""
    span = stats.q99[slot] - stats.q01[slot] + 1e-6
    return (actions[slot].double().numpy() + 1.0) / 2.0 * span + stats.q01[slot]


@pytest.fixture(scope="module")
def steps_dataset(tmp_path_factory):
    # 21 frames at 20 fps, target 10 fps: stride 2, 11 sampled frames, 9 kept = 1 + 4*2, so F = 3, N = 8.
    return write_dataset(tmp_path_factory.mktemp("steps") / "steps", [step_episode(21), step_episode(25)])


def test_align_actions_puts_raw_steps_into_the_group_they_lead_into():
    raw = np.arange(20, dtype=np.float32)[:, None]
    groups = align_actions(raw, num_latent_frames=3, actions_per_frame=8)
    assert groups.shape == (3, 8, 1)
    np.testing.assert_array_equal(groups[0, :, 0], np.zeros(8))
    np.testing.assert_array_equal(groups[1, :, 0], np.arange(0, 8))
    np.testing.assert_array_equal(groups[2, :, 0], np.arange(8, 16))


def test_samples_have_latents_actions_and_text_of_the_expected_shapes(steps_dataset):
    samples, _ = build(steps_dataset)
    sample = samples[0]
    assert sample.latents.shape == (48, 3, 4, 4)
    assert sample.actions.shape == (ACTION_DIM, 3, 8)
    torch.testing.assert_close(sample.text_emb, StandInTextEncoder(text_dim=16, max_tokens=8).encode(TASK))


def test_sample_keys_name_the_source_folder_and_episode(steps_dataset):
    samples, _ = build(steps_dataset)
    assert [s.key for s in samples] == ["steps/episode_000000", "steps/episode_000001"]
    assert {s.source for s in samples} == {"steps"}
    assert build(steps_dataset, source="demo")[0][1].key == "demo/episode_000001"


def test_built_groups_hold_exactly_the_expected_raw_steps(steps_dataset):
    samples, stats = build(steps_dataset)
    raw = denormalize(samples[1].actions, stats, slot=0)  # episode of 25 frames: 13 sampled, F = 4
    np.testing.assert_allclose(raw[1:], np.arange(0, 24).reshape(3, 8), atol=1e-4)
    np.testing.assert_allclose(-denormalize(samples[1].actions, stats, slot=1)[1:], raw[1:], atol=1e-4)


def test_dummy_group_zero_is_zero_after_normalisation(steps_dataset):
    samples, _ = build(steps_dataset)
    assert (samples[0].actions[:, 0] == 0).all()


def test_latent_frames_come_from_frames_sampled_at_the_stride(steps_dataset):
    samples, _ = build(steps_dataset)
    frames = LeRobotDataset(steps_dataset).read_episode(0).frames["observation.images.top"]
    torch.testing.assert_close(samples[0].latents, StandInVideoEncoder().encode(frames[0:17:2]))


def test_stats_are_the_1_and_99_percent_quantiles_of_all_raw_actions(steps_dataset):
    _, stats = build(steps_dataset)
    raw = np.concatenate([np.arange(21), np.arange(25)]).astype(np.float64)
    assert stats.q01[0] == pytest.approx(np.quantile(raw, 0.01), rel=1e-6)
    assert stats.q99[1] == pytest.approx(np.quantile(-raw, 0.99), rel=1e-6)
    assert (stats.q01[2:] == 0).all() and (stats.q99[2:] == 0).all()


def test_quantiles_normalise_to_minus_one_and_one_and_outliers_clip_at_1_5():
    q01, q99 = np.zeros(ACTION_DIM), np.zeros(ACTION_DIM)
    q01[0], q99[0] = -2.0, 2.0
    mask = np.zeros(ACTION_DIM, bool)
    mask[0] = True
    raw = np.zeros((4, ACTION_DIM))
    raw[:, 0] = [-2.0, 2.0, 10.0, -10.0]
    normalized = ActionStats(q01, q99).normalize(raw, mask)
    np.testing.assert_allclose(normalized[:, 0], [-1.0, 1.0, 1.5, -1.5], atol=1e-5)


def test_an_outlier_action_is_clipped_to_1_5_in_the_samples(tmp_path):
    root = write_dataset(tmp_path / "outlier", [step_episode(41, outlier=1e4)])
    samples, _ = build(root)
    assert samples[0].actions.abs().max().item() == pytest.approx(1.5)
    assert (samples[0].actions[0] == 1.5).sum() == 1


def test_action_mask_and_values_sit_on_the_mapped_slots(steps_dataset):
    samples, _ = build(steps_dataset, channels=(7, 28))
    sample = samples[0]
    assert sample.action_mask.nonzero().flatten().tolist() == [7, 28]
    unused = [slot for slot in range(ACTION_DIM) if slot not in (7, 28)]
    assert (sample.actions[unused] == 0).all()
    assert (sample.actions[[7, 28], 1:] != 0).any()


def test_stats_survive_a_dict_round_trip(steps_dataset):
    _, stats = build(steps_dataset)
    restored = ActionStats.from_dict(stats.to_dict())
    np.testing.assert_array_equal(restored.q01, stats.q01)
    np.testing.assert_array_equal(restored.q99, stats.q99)


def test_stats_with_the_wrong_length_are_a_user_error():
    with pytest.raises(UserError, match="30 values"):
        ActionStats.from_dict({"q01": [0.0] * 29, "q99": [1.0] * 29})


def test_target_fps_that_does_not_divide_the_dataset_fps_is_a_user_error(steps_dataset):
    with pytest.raises(UserError, match="fps 20 is not a positive integer multiple of target_fps 3"):
        build(steps_dataset, target_fps=3)


def test_action_channels_of_the_wrong_length_are_a_user_error(steps_dataset):
    with pytest.raises(UserError, match="action_channels has 3 entries but the dataset's actions have 2 dims"):
        build(steps_dataset, channels=(0, 1, 2))


def test_episodes_too_short_for_two_latent_frames_are_skipped(tmp_path):
    root = write_dataset(tmp_path / "short", [step_episode(7), step_episode(21)])
    samples, _ = build(root)
    assert [s.key for s in samples] == ["short/episode_000001"]

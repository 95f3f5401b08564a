"""Actions through `prepare` (stand-in encoders): alignment to latent frames (spec 2.1), the 30-d
mapping, quantile statistics and normalisation, on episodes whose raw actions name their step."""

import itertools
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from lbva.models.action_space import ACTION_DIM, ActionStats
from lbva.training.data.alignment import align_actions
from lbva.training.data.demo_world import DemoEpisode, LeRobotWriter

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


@dataclass
class PreparedSample:
    key: str
    source: str
    actions: torch.Tensor  # [30, F, N] float32
    action_mask: torch.Tensor  # [30] bool


@pytest.fixture
def build(tmp_path, run_standin, shards_of):
    """prepare(root) at 10 fps with the given action slots -> (samples in key order, the source's ActionStats)."""

    runs = itertools.count()

    def run(root, channels=(0, 1), **overrides):
        out = tmp_path / f"prepared-{next(runs)}"
        report = run_standin(root, out, action_channels=list(channels), **overrides)
        samples = [PreparedSample(key, report.source, torch.from_numpy(actions), torch.from_numpy(mask))
                   for key, (_, actions, mask, _) in sorted(shards_of(out, report.source).items())]
        stats = ActionStats.from_dict(json.loads((out / "stats" / f"{report.source}.json").read_text()))
        return samples, stats

    return run


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


def test_sample_keys_name_the_source_folder_and_episode(steps_dataset, build):
    samples, _ = build(steps_dataset)
    assert [s.key for s in samples] == ["steps__e000000__s000", "steps__e000001__s000"]
    assert {s.source for s in samples} == {"steps"}
    assert build(steps_dataset, source="demo")[0][1].key == "demo__e000001__s000"


def test_built_groups_hold_exactly_the_expected_raw_steps(steps_dataset, build):
    samples, stats = build(steps_dataset)
    raw = denormalize(samples[1].actions, stats, slot=0)  # episode of 25 frames: 13 sampled, F = 4
    np.testing.assert_allclose(raw[1:], np.arange(0, 24).reshape(3, 8), atol=1e-4)
    np.testing.assert_allclose(-denormalize(samples[1].actions, stats, slot=1)[1:], raw[1:], atol=1e-4)


def test_dummy_group_zero_is_zero_after_normalisation(steps_dataset, build):
    samples, _ = build(steps_dataset)
    assert (samples[0].actions[:, 0] == 0).all()


def test_stats_are_the_1_and_99_percent_quantiles_of_all_raw_actions(steps_dataset, build):
    _, stats = build(steps_dataset)
    raw = np.concatenate([np.arange(21), np.arange(25)]).astype(np.float64)
    assert stats.q01[0] == pytest.approx(np.quantile(raw, 0.01), rel=1e-6)
    assert stats.q99[1] == pytest.approx(np.quantile(-raw, 0.99), rel=1e-6)
    assert (stats.q01[2:] == 0).all() and (stats.q99[2:] == 0).all()


def test_an_outlier_action_is_clipped_to_1_5_in_the_samples(tmp_path, build):
    root = write_dataset(tmp_path / "outlier", [step_episode(41, outlier=1e4)])
    samples, _ = build(root)
    assert samples[0].actions.abs().max().item() == pytest.approx(1.5)
    assert (samples[0].actions[0] == 1.5).sum() == 1


def test_action_mask_and_values_sit_on_the_mapped_slots(steps_dataset, build):
    samples, _ = build(steps_dataset, channels=(7, 28))
    sample = samples[0]
    assert sample.action_mask.nonzero().flatten().tolist() == [7, 28]
    unused = [slot for slot in range(ACTION_DIM) if slot not in (7, 28)]
    assert (sample.actions[unused] == 0).all()
    assert (sample.actions[[7, 28], 1:] != 0).any()


def test_episodes_too_short_for_two_latent_frames_are_skipped(tmp_path, build):
    root = write_dataset(tmp_path / "short", [step_episode(7), step_episode(21)])
    samples, _ = build(root)
    assert [s.key for s in samples] == ["short__e000001__s000"]

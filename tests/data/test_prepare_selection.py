"""`prepare`'s defaults from the data, its episode selection and split, statistics on the training
episodes only, and what it tells a progress display."""

import json

import numpy as np
import pytest

from lbva.errors import UserError
from lbva.training.data.index import SourceIndex, read_table
from lbva.training.data.lerobot import LeRobotDataset
from lbva.training.data.prepare import default_camera_sizes, default_target_fps
from lbva.training.data.split import heldout_episodes


@pytest.mark.parametrize("fps, target", [(30, 10), (20, 10), (10, 10), (15, 15), (25, 5), (24, 12), (8, 8), (50, 10)])
def test_the_default_target_fps_is_the_dataset_fps_divisor_closest_to_10(fps, target):
    assert default_target_fps(fps) == target


def test_default_camera_sizes_keep_a_small_camera_s_own_size(v21_dataset):
    assert default_camera_sizes(LeRobotDataset(v21_dataset), ["observation.images.top"], "side_by_side") == [(64, 64)]


def test_prepare_without_sizes_or_fps_follows_the_dataset(v21_dataset, tmp_path, run_standin):
    report = run_standin(v21_dataset, tmp_path, heights=[], widths=[], target_fps=None)
    card = json.loads((tmp_path / "card.json").read_text())["sources"]["demo"]
    assert (report.target_fps, card["target_fps"], card["tiling"]["camera_sizes"]) == (10, 10, [[64, 64]])


def test_only_the_chosen_episodes_are_prepared(v21_dataset, tmp_path, run_standin, index_of):
    run_standin(v21_dataset, tmp_path, episodes=[0, 1, 2], exclude_episodes=[1])
    assert sorted({line["episode"] for line in index_of(tmp_path, "demo")}) == [0, 2]


def test_an_episode_the_dataset_lacks_is_refused_naming_the_option(v21_dataset, tmp_path, run_standin):
    with pytest.raises(UserError, match="--exclude-episodes: the dataset has no episode 9"):
        run_standin(v21_dataset, tmp_path, exclude_episodes=[9])


def test_the_split_holds_out_the_episodes_training_validates_on(v21_dataset, tmp_path, run_standin):
    report = run_standin(v21_dataset, tmp_path, split=("val", 0.5))
    training = heldout_episodes(SourceIndex("demo", tmp_path, read_table(tmp_path, "demo")), 0.5)
    card = json.loads((tmp_path / "card.json").read_text())["sources"]["demo"]
    assert report.heldout == card["split"]["heldout_episodes"] == training.tolist() and len(report.heldout) == 2


def test_action_statistics_leave_the_held_out_episodes_out(v21_dataset, tmp_path, run_standin):
    report = run_standin(v21_dataset, tmp_path, split=("val", 0.5))
    dataset = LeRobotDataset(v21_dataset)
    kept = np.concatenate([dataset.read_actions(e) for e in dataset.episode_indices if e not in report.heldout])
    stats = json.loads((tmp_path / "stats" / "demo.json").read_text())
    np.testing.assert_allclose(stats["q01"][:2], np.quantile(kept, 0.01, axis=0))
    np.testing.assert_allclose(stats["q99"][:2], np.quantile(kept, 0.99, axis=0))


def test_a_split_fraction_outside_0_1_is_refused(v21_dataset, tmp_path, run_standin):
    with pytest.raises(UserError, match="--split val=1.0: the fraction must lie between 0 and 1"):
        run_standin(v21_dataset, tmp_path, split=("val", 1.0))


def test_actions_map_by_their_names(v21_dataset, tmp_path, run_standin):
    run_standin(v21_dataset, tmp_path, action_channels=[], action_map="dx=left_y,dy=7")
    assert json.loads((tmp_path / "card.json").read_text())["sources"]["demo"]["action_channels"] == [1, 7]


class CountingProgress:
    def __init__(self):
        self.total, self.done = None, 0

    def begin(self, episodes):
        self.total = episodes

    def advance(self):
        self.done += 1


def test_progress_hears_of_every_episode_encoded(v21_dataset, tmp_path):
    from lbva.models.encoders import EncoderChoice
    from lbva.training.data.prepare import PrepareConfig, prepare

    progress = CountingProgress()
    prepare(PrepareConfig(src=v21_dataset, out=tmp_path, action_channels=[0, 1], heights=[64], widths=[64],
                          encoders=EncoderChoice("standin", standin_text_dim=16)), progress)
    assert progress.total == progress.done == 4

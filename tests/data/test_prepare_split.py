"""Array tasks split the episodes deterministically; a worker pool gives the same bytes as one process."""

import argparse

import numpy as np

from lbva.training.data.cli import register


def test_two_tasks_together_produce_exactly_the_samples_of_one_task(v3_dataset, tmp_path, run_standin, shards_of,
                                                                   index_of):
    cameras = {"cameras": ["observation.images.cam_high"]}
    run_standin(v3_dataset, tmp_path / "one", workers=2, **cameras)
    for task in (0, 1):
        run_standin(v3_dataset, tmp_path / "two", task_id=task, num_tasks=2, **cameras)
    one, two = shards_of(tmp_path / "one", "robot"), shards_of(tmp_path / "two", "robot")  # raise on duplicates
    assert sorted(one) == sorted(two) and len(one) == 5
    for key, (latents, actions, mask, meta) in one.items():
        np.testing.assert_array_equal(two[key][0], latents)
        np.testing.assert_array_equal(two[key][1], actions)
        assert two[key][3] == meta
    assert sorted(line["key"] for line in index_of(tmp_path / "two", "robot")) == sorted(one)


def test_episode_i_goes_to_task_i_mod_n(v3_dataset, tmp_path, run_standin, index_of):
    run_standin(v3_dataset, tmp_path, task_id=1, num_tasks=2, cameras=["observation.images.cam_high"])
    lines = index_of(tmp_path, "robot")
    assert sorted(line["episode"] for line in lines) == [1, 3]
    assert {line["shard"].split("/")[-1][:4] for line in lines} == {"t001"}


def test_task_defaults_come_from_the_slurm_array(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["data", "prepare", "src", "out"])
    assert (args.task_id, args.num_tasks) == (2, 4)

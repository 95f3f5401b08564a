"""The held-out split: whole episodes per source, never trained on, validated on every layout."""

import json

import numpy as np
import pytest
from rich.console import Console

from lbva.training.data.reader import read_index
from lbva.training.data.split import heldout_episodes, split_sources
from lbva.training.ledger import read_ledger
from lbva.training.metrics import read_metrics
from lbva.training.trainer import train

from helpers import prepared_demo, tiny_train_config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return prepared_demo(tmp_path_factory.mktemp("data"), num_episodes=6, frames_per_episode=41, image_size=64, seed=3)


def test_the_split_holds_out_whole_episodes_the_same_way_every_time(dataset):
    sources, _ = read_index([dataset], "fail")
    first, second = split_sources(sources, 0.34), split_sources(read_index([dataset], "fail")[0], 0.34)
    train_part, heldout = first.train[0], first.heldout[0]
    assert len(train_part) + len(heldout) == len(sources[0])
    assert not set(train_part.episodes) & set(heldout.episodes)
    assert len(set(heldout.episodes)) == 2  # round(0.34 x 6)
    assert heldout.keys(np.arange(len(heldout))) == second.heldout[0].keys(np.arange(len(second.heldout[0])))
    assert train_part.fingerprint != sources[0].fingerprint


def test_a_single_episode_source_keeps_everything_for_training(dataset):
    source = read_index([dataset], "fail")[0][0]
    only = source.subset(np.flatnonzero(source.episodes == source.episodes[0]), "one")
    assert len(heldout_episodes(only, 0.5)) == 0
    assert split_sources([only], 0.5).heldout == []


def test_training_never_draws_a_heldout_sample_and_validates_on_them(dataset, tmp_path):
    config = tiny_train_config(dataset, tmp_path, "run.steps=6", "run.log_every=2", "run.eval_every=4",
                               "data.validation_fraction=0.34")
    run = train(config, Console(quiet=True))
    heldout = json.loads((run.run_dir / "validation_keys.json").read_text())["pusher"]
    assert heldout
    trained = {window.split("@")[0] for windows in read_ledger(run.run_dir).values() for window in windows}
    assert trained and not trained & set(heldout)
    records = {r["step"]: r for r in read_metrics(run.run_dir / "metrics.jsonl")}
    assert "loss_eval" not in records[2]  # logged, not a validation step
    for step in (4, 6):  # every run.eval_every steps and the last
        assert {"loss_eval", "val/pusher/loss", "val/pusher/video", "val/pusher/action"} <= set(records[step])
        assert records[step]["loss_eval"] == pytest.approx(records[step]["val/pusher/loss"])

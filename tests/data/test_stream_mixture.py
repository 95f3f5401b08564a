"""The data plan: mixture weights, per-source epochs, windows and bins within the token budget."""

from collections import Counter

import numpy as np
import pytest

from lbva.errors import UserError
from lbva.training.data.packing import TokenCost
from lbva.training.data.plan import PlanCost
from lbva.training.data.reader import SampleReader
from stream_fixtures import CHANNELS, PATCH, TEXT_TOKENS, episode_frames, make_loader, make_stream, take, write_prepared

BLOCKS = 500  # x 4 draws per block


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    frames = {"alpha": episode_frames(7, seed=1), "beta": episode_frames(5, seed=2), "gamma": episode_frames(3, seed=3)}
    write_prepared(root, frames)
    return root


def _shares(stream) -> dict[str, float]:
    draws = np.concatenate([stream.plan.draw_sources(block) for block in range(BLOCKS)])
    counts = Counter(stream.plan.names[i] for i in draws)
    return {name: counts[name] / len(draws) for name in stream.plan.names}


def _tolerance(p: float) -> float:
    return 5 * (p * (1 - p) / (BLOCKS * 4)) ** 0.5  # five binomial standard deviations


def test_sources_are_drawn_uniformly_by_default(dataset):
    for share in _shares(make_stream([dataset])).values():
        assert abs(share - 1 / 3) < _tolerance(1 / 3)


def test_weights_set_each_source_share_of_draws(dataset):
    shares = _shares(make_stream([dataset], weights={"alpha": 3, "beta": 1, "gamma": 0}))
    assert abs(shares["alpha"] - 0.75) < _tolerance(0.75)
    assert abs(shares["beta"] - 0.25) < _tolerance(0.25)
    assert shares["gamma"] == 0


def test_weights_naming_an_unknown_source_are_a_user_error(dataset):
    with pytest.raises(UserError, match="unknown sources"):
        make_stream([dataset], weights={"alpha": 1, "delta": 1})


def test_a_source_yields_every_sample_once_per_source_epoch(dataset):
    stream = make_stream([dataset], block_samples=1)  # one draw per block: the draw order is visible
    drawn: dict[str, list[str]] = {s.name: [] for s in stream.sources}
    cursor = stream.plan.start()
    for _ in range(200):
        bins, cursor = stream.plan.plan_block(cursor)
        (entry,) = {w.sample for b in bins for w in b}
        drawn[entry.source].append(entry.key)
    for source in stream.sources:
        keys = sorted(e.key for e in source.entries)
        order = drawn[source.name]
        epochs = [order[i : i + len(keys)] for i in range(0, len(order) - len(keys) + 1, len(keys))]
        assert len(epochs) >= 2
        assert all(sorted(epoch) == keys for epoch in epochs)
        assert epochs[0] != epochs[1]  # each epoch has its own permutation


def test_planned_bins_fit_the_budget_and_cut_windows_on_chunk_boundaries(dataset):
    stream = make_stream([dataset], token_budget=60, window_frames=8, chunk_multiple=2)
    cursor = stream.plan.start()
    for _ in range(10):
        bins, cursor = stream.plan.plan_block(cursor)
        for windows in bins:
            assert sum(w.frames * stream.plan.cost.per_frame(w.sample) for w in windows) <= 60
            assert all(w.start % 2 == 0 for w in windows)
    for sequence in take(make_loader([dataset], token_budget=60, window_frames=8, chunk_multiple=2), 12):
        assert sequence.real_tokens <= 60


def test_the_plan_charges_a_frame_what_packing_charges_the_loaded_sample(dataset):
    stream = make_stream([dataset])
    reader = SampleReader(stream.sources, text_tokens=TEXT_TOKENS, latent_channels=CHANNELS, patch=PATCH)
    entry = stream.sources[0].entries[0]
    for forward_dynamics in (False, True):
        planned = PlanCost(forward_dynamics).per_frame(entry)
        loaded = TokenCost(PATCH, forward_dynamics).per_frame(reader.load(entry))
        assert planned == loaded if not forward_dynamics else planned >= loaded


def test_a_budget_below_one_frame_is_a_user_error(dataset):
    with pytest.raises(UserError, match="token_budget"):
        make_stream([dataset], token_budget=10)

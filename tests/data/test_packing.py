"""Episode windows -> packed sequences with the metadata the masks and losses need."""

import pytest
import torch

from helpers import random_sample
from lbva.models.masks import CLEAN, NOISY, NOISY_FDM, PADDING
from lbva.training.data.packing import TokenCost, build_packed_sequence, cut_windows, first_fit

PATCH = (1, 2, 2)


def test_windows_are_cut_on_chunk_boundaries():
    sample = random_sample("a/0", torch.Generator().manual_seed(0), frames=11)
    windows = cut_windows(sample, max_frames=6, frame_multiple=4)
    assert [(w.start, w.frames) for w in windows] == [(0, 4), (4, 4), (8, 3)]


def test_first_fit_never_exceeds_the_budget_and_keeps_every_window():
    generator = torch.Generator().manual_seed(0)
    cost = TokenCost(PATCH, forward_dynamics=False)
    windows = [w for i in range(5) for w in cut_windows(random_sample(f"a/{i}", generator, frames=7), 4, 4)]
    bins = first_fit(windows, budget=400, cost=cost)
    assert sorted(w.key for b in bins for w in b) == sorted(w.key for w in windows)
    for b in bins:
        assert sum(w.frames * cost.per_frame(w.sample) for w in b) <= 400


def test_a_window_larger_than_the_budget_is_an_error():
    sample = random_sample("a/0", torch.Generator().manual_seed(0), frames=4)
    with pytest.raises(ValueError, match="budget"):
        first_fit(cut_windows(sample, 4, 4), budget=10, cost=TokenCost(PATCH, False))


def test_each_window_contributes_noisy_and_clean_copies():
    sample = random_sample("a/0", torch.Generator().manual_seed(0), frames=3, height=4, width=4, actions_per_frame=5)
    seq = build_packed_sequence(cut_windows(sample, 3, 4), PATCH, pad_multiple=1, forward_dynamics=False)
    tokens_per_frame = 2 * 2
    assert (seq.video_role == NOISY).sum() == 3 * tokens_per_frame
    assert (seq.video_role == CLEAN).sum() == 3 * tokens_per_frame
    assert (seq.action_role == NOISY).sum() == 3 * 5 and (seq.action_role == CLEAN).sum() == 3 * 5
    assert torch.equal(seq.video_x0[seq.video_role == NOISY], seq.video_x0[seq.video_role == CLEAN])


def test_forward_dynamics_adds_a_third_video_copy():
    sample = random_sample("a/0", torch.Generator().manual_seed(0), frames=2, height=4, width=4)
    seq = build_packed_sequence(cut_windows(sample, 2, 4), PATCH, pad_multiple=1, forward_dynamics=True)
    assert (seq.video_role == NOISY_FDM).sum() == (seq.video_role == NOISY).sum() > 0


def test_parts_are_padded_to_the_multiple_with_padding_ids():
    sample = random_sample("a/0", torch.Generator().manual_seed(0), frames=3, height=4, width=4)
    seq = build_packed_sequence(cut_windows(sample, 3, 4), PATCH, pad_multiple=64, forward_dynamics=False)
    assert seq.video_x0.shape[0] % 64 == 0 and seq.action_x0.shape[0] % 64 == 0
    assert seq.real_tokens == 2 * 3 * 4 + 2 * 3 * 4
    assert (seq.video_sample == PADDING).sum() == seq.video_x0.shape[0] - 24


def test_first_action_group_of_a_window_is_never_supervised():
    sample = random_sample("a/0", torch.Generator().manual_seed(0), frames=3, actions_per_frame=4)
    seq = build_packed_sequence(cut_windows(sample, 3, 4), PATCH, pad_multiple=1, forward_dynamics=False)
    assert not seq.action_supervised[seq.action_frame == 0].any()
    assert seq.action_supervised[seq.action_frame > 0].all()


def test_action_channels_follow_the_source_mask():
    sample = random_sample("a/0", torch.Generator().manual_seed(0), frames=2, channels=(0, 7, 28))
    seq = build_packed_sequence(cut_windows(sample, 2, 4), PATCH, pad_multiple=1, forward_dynamics=False)
    assert seq.action_channels[0].nonzero().flatten().tolist() == [0, 7, 28]


def test_frame_slots_are_distinct_across_windows():
    generator = torch.Generator().manual_seed(0)
    samples = [random_sample(f"a/{i}", generator, frames=3, height=4, width=4) for i in range(2)]
    windows = [w for s in samples for w in cut_windows(s, 3, 4)]
    seq = build_packed_sequence(windows, PATCH, pad_multiple=1, forward_dynamics=False)
    assert seq.num_slots == 6
    assert set(seq.video_slot[seq.video_sample == 1].tolist()) == {3, 4, 5}
    assert seq.text.shape[0] == 2

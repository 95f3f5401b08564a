"""Prepared samples read back as EpisodeSamples and packed sequences."""

import numpy as np
import pytest
import torch

from lbva.training.data.reader import SampleReader
from stream_fixtures import CHANNELS, PATCH, TEXT_TOKENS, episode_frames, make_loader, make_stream, take, write_prepared


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("prepared"), {"alpha": episode_frames(5, seed=1)})


def test_a_sample_reads_back_as_written_with_its_text_zero_padded(prepared):
    stream = make_stream([prepared.root])
    reader = SampleReader(stream.sources, text_tokens=TEXT_TOKENS, latent_channels=CHANNELS, patch=PATCH)
    for entry in stream.sources[0].entries:
        sample = reader.load(entry)
        assert sample.latents.dtype == torch.float32
        assert np.array_equal(sample.latents.numpy(), prepared.latents[entry.key].astype(np.float32))
        text = prepared.texts[entry.key]
        assert torch.equal(sample.text_emb[: len(text)], torch.from_numpy(text).float())
        assert not sample.text_emb[len(text) :].any()
        assert sample.text_emb.shape == (TEXT_TOKENS, text.shape[1])


def test_the_empty_text_embedding_is_available_for_text_dropout(prepared):
    empty = make_stream([prepared.root]).empty_text
    assert empty.shape[0] == TEXT_TOKENS and empty[0].any() and not empty[1:].any()


def test_sequences_carry_the_latents_of_their_windows(prepared):
    sequence = take(make_loader([prepared.root]), 1)[0]
    key, span = sequence.window_keys[0].split("@")
    start, frames = map(int, span.split("+"))
    latents = torch.from_numpy(prepared.latents[key][:, start : start + frames].astype(np.float32))
    first_token = sequence.video_x0[0].view(CHANNELS, 2, 2)  # channel-major patch of frame 0, row 0, col 0
    assert torch.equal(first_token, latents[:, 0, :2, :2])
    assert sequence.text.shape[0] == len(sequence.window_keys)
    assert sequence.num_slots == sum(int(k.split("+")[1]) for k in sequence.window_keys)

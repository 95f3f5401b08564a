"""Wan's prompt cleaning runs before every tokenization: messy and clean spellings of one prompt give
the same tokens, in the stand-in and in the real (tiny umT5) text encoder."""

import torch

from lbva.models.encoders import EncoderChoice, StandInText, prompt_clean

MESSY = "  pick\tup   the red\n\ncube &amp;amp; place it  "
CLEAN = "pick up the red cube & place it"


def test_prompt_clean_collapses_whitespace_and_unescapes_twice():
    assert prompt_clean(MESSY) == CLEAN


def test_standin_text_encoder_cleans_before_tokenizing():
    encoder = StandInText(text_dim=8)
    messy, clean = encoder.encode([MESSY, CLEAN])
    assert torch.equal(messy, clean)


def test_umt5_text_encoder_cleans_before_tokenizing(tmp_path):
    from lbva.training.data.tiny_models import write_tiny_umt5

    folder = write_tiny_umt5(tmp_path / "umt5", words=CLEAN.split())
    encoder = EncoderChoice(kind="real", vae=tmp_path, text_encoder=folder).text("cpu")
    messy, clean = encoder.encode([MESSY, CLEAN])
    assert messy.shape == clean.shape and torch.allclose(messy, clean)

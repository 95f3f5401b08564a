"""Every shape and dtype a shard can hold is checked before packing: complex or string latents, a
height or width the patch cannot take (although the token count matches the index), a text
embedding of another width. Such a sample is skipped and logged with its key and shard like any
bad sample; under on_error='fail' the loader stops with one line, also through loader workers."""

import io
import logging
import tarfile
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from data.stream_fixtures import CHANNELS, TEXT_DIM, episode_frames, make_loader, take, write_prepared
from lbva.training.data.format import text_id
from lbva.training.data.reader import DataError

FRAMES = {"alpha": episode_frames(4, seed=1), "beta": episode_frames(3, seed=2)}
BAD = "alpha__e000001__s000"


def _replace_member(shard, name: str, data: bytes) -> None:
    """Rewrite the one-sample shard with member `name` (e.g. latents.npy) replaced by `data`."""
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for info, content in members:
            if info.name.endswith("." + name):
                content, info.size = data, len(data)
            tar.addfile(info, io.BytesIO(content))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _break(prepared, how: str) -> None:
    shard, latents = prepared.shards[BAD], prepared.latents[BAD]
    if how == "complex":
        _replace_member(shard, "latents.npy", _npy(latents.astype(np.complex64)))
    elif how == "string":
        _replace_member(shard, "latents.npy", _npy(np.full(latents.shape, "x", dtype="<U1")))
    elif how == "odd_height":
        # [C, F, 5, 4] patchifies to as many tokens as the index's [C, F, 4, 4] at patch 2 x 2.
        c, f, _, w = latents.shape
        _replace_member(shard, "latents.npy", _npy(np.zeros((c, f, 5, w), dtype=np.float16)))
    elif how == "text_width":
        path = prepared.root / "texts" / "alpha" / "t000.safetensors"
        texts = load_file(path)
        wanted = text_id(f"alpha task {1 % 2}")  # episode 1's text
        texts[wanted] = torch.zeros(3, TEXT_DIM + 4, dtype=torch.float16)
        save_file(texts, str(path))


KINDS = {"complex": "undecodable", "string": "undecodable", "odd_height": "bad_shape", "text_width": "bad_shape"}


def _keys(sequences) -> set[str]:
    return {key.split("@")[0] for s in sequences for key in s.window_keys}


@pytest.mark.parametrize("how", list(KINDS))
def test_a_sample_of_a_shape_or_dtype_packing_cannot_take_is_skipped_and_logged(tmp_path, caplog, how):
    prepared = write_prepared(tmp_path, FRAMES, samples_per_shard=1)
    _break(prepared, how)
    loader = make_loader([tmp_path])
    with caplog.at_level(logging.WARNING, logger="lbva.data"), warnings.catch_warnings():
        warnings.simplefilter("error")  # no ComplexWarning: nothing is cast and trained on
        sequences = take(loader, 30)
    bad_keys = {BAD} if how != "text_width" else {k for k in prepared.latents if k.startswith("alpha__e00000")
                                                  and int(k[8:14]) % 2 == 1}
    assert _keys(sequences) == set(prepared.latents) - bad_keys
    assert set(loader.bad_data) == {KINDS[how]}
    assert loader.samples_skipped >= 1 and loader.samples_read > loader.samples_skipped
    shard = str(prepared.shards[BAD])
    assert any(BAD in r.getMessage() and shard in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_under_the_fail_policy_a_bad_shape_stops_with_one_line_naming_key_and_shard(tmp_path, num_workers):
    prepared = write_prepared(tmp_path, FRAMES, samples_per_shard=1)
    _break(prepared, "odd_height")
    with pytest.raises(DataError) as raised:
        take(make_loader([tmp_path], on_error="fail", num_workers=num_workers), 30)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"bad_shape: sample {BAD} in {prepared.shards[BAD]}")


def test_the_latent_channel_count_is_still_checked(tmp_path):
    prepared = write_prepared(tmp_path, FRAMES, samples_per_shard=1)
    c, f, h, w = prepared.latents[BAD].shape
    _replace_member(prepared.shards[BAD], "latents.npy", _npy(np.zeros((CHANNELS + 1, f, h, w), dtype=np.float16)))
    loader = make_loader([tmp_path])
    assert BAD not in _keys(take(loader, 30)) and set(loader.bad_data) == {"undecodable"}

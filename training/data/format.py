"""The on-disk format of a prepared dataset: the contract between `lbva data prepare` and the
training stream.

    OUT/card.json                         what was prepared and how (encoders, stats, layout, versions)
    OUT/shards/{source}/t{task:03d}-{n:05d}.tar   webdataset shards, committed by rename
    OUT/index/{source}/t{task:03d}.jsonl  one line per sample: key, source, shard, episode, frames, tokens,
                                          offset, size (the sample's bytes in the shard; lines written
                                          before prepare recorded them lack the two)
    OUT/index/{source}/columns.idx        the same for all tasks as memory-mappable columns (index.py),
                                          rebuilt from the jsonl lines by prepare or `lbva data index`
    OUT/texts/{source}/t{task:03d}.safetensors    text embeddings by text id, true length only
    OUT/stats/{source}.json               per-source action quantiles (ActionStats.to_dict())

A sample in a shard has these members (webdataset key = `sample_key(...)`, no dots in it):
    latents.npy      float16 [C, F, h, w]   normalised VAE posterior mean, cameras tiled
    actions.npy      float32 [30, F, N]     normalised, clipped to +-1.5; group 0 zero (spec 2.1)
    action_mask.npy  bool    [30]           slots the source fills (all False: video-only source)
    meta.json        SampleMeta as JSON
The npy members are stored uncompressed in the tar, so a reader takes the frames [s, s+n) of one
window straight from the shard: one byte range per channel of latents.npy and per action dim of
actions.npy (SampleReader.load_frames); the layout is unchanged since FORMAT_VERSION 1.
Text embeddings are stored once per unique text (`text_id`) and zero-padded to the model's text
length when read; the empty text's embedding is stored under EMPTY_TEXT_ID.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass

import numpy as np

FORMAT_VERSION = 1
EMPTY_TEXT_ID = "empty"
MEMBERS = ("latents.npy", "actions.npy", "action_mask.npy", "meta.json")


def sample_key(source: str, episode: int, segment: int) -> str:
    return f"{source}__e{episode:06d}__s{segment:03d}"


def text_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class SampleMeta:
    key: str
    source: str
    episode: int
    segment: int
    start_frame: int  # raw frame range of the segment, [start, end)
    end_frame: int
    fps: int
    target_fps: int
    text: str
    text_id: str
    latent_frames: int
    tokens_per_frame: int  # video + action tokens of one copy of one latent frame


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def encode_members(latents: np.ndarray, actions: np.ndarray, action_mask: np.ndarray, meta: SampleMeta) -> dict:
    """The dict handed to webdataset's ShardWriter.write (bytes per member, plus __key__)."""
    return {
        "__key__": meta.key,
        "latents.npy": _npy(latents.astype(np.float16)),
        "actions.npy": _npy(actions.astype(np.float32)),
        "action_mask.npy": _npy(action_mask.astype(bool)),
        "meta.json": json.dumps(asdict(meta)).encode("utf-8"),
    }


def decode_members(members: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, SampleMeta]:
    """Inverse of encode_members on raw bytes; raises KeyError / ValueError on a malformed sample."""
    missing = [m for m in MEMBERS if m not in members]
    if missing:
        raise KeyError(f"sample {members.get('__key__', '?')} lacks {missing}")
    load = lambda name: np.load(io.BytesIO(members[name]), allow_pickle=False)  # noqa: E731
    meta = SampleMeta(**json.loads(members["meta.json"]))
    return load("latents.npy"), load("actions.npy"), load("action_mask.npy"), meta

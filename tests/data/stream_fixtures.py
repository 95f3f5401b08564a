"""Small prepared datasets for the stream tests, written with format.encode_members and
webdataset.ShardWriter exactly as `lbva data prepare` lays them out (format.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import webdataset
from safetensors.torch import save_file

from lbva.training.data.format import EMPTY_TEXT_ID, SampleMeta, encode_members, sample_key, text_id
from lbva.training.data.loader import PackedLoader, PreparedStream

CHANNELS, HEIGHT, WIDTH, ACTIONS_PER_FRAME, TEXT_DIM, TEXT_TOKENS = 4, 4, 4, 2, 8, 8
PATCH = (1, 2, 2)
TOKENS_PER_FRAME = (HEIGHT // 2) * (WIDTH // 2) + ACTIONS_PER_FRAME  # one copy: 4 video + 2 action

# Ways to write a broken sample (the key's shard and index line stay consistent otherwise).
BREAKAGES = ("nan_latents", "inf_actions", "short_actions", "index_frames", "garbage_latents")


@dataclass
class Prepared:
    root: Path
    latents: dict[str, np.ndarray] = field(default_factory=dict)  # key -> float16 [C, F, h, w]
    texts: dict[str, np.ndarray] = field(default_factory=dict)  # key -> float16 [len, TEXT_DIM]
    shards: dict[str, Path] = field(default_factory=dict)  # key -> shard file


def write_prepared(
    root: Path,
    frames: dict[str, list[int]],
    *,
    broken: dict[str, str] | None = None,
    samples_per_shard: int = 3,
    seed: int = 0,
) -> Prepared:
    """One dataset folder: for each source, one episode per entry of frames[source] (its latent
    frame count), one prepare task (t000). broken: sample key -> one of BREAKAGES."""
    broken = broken or {}
    generator = np.random.default_rng(seed)
    prepared = Prepared(root)
    for source, counts in frames.items():
        for folder in ("shards", "index", "texts"):
            (root / folder / source).mkdir(parents=True, exist_ok=True)
        texts = {EMPTY_TEXT_ID: generator.standard_normal((1, TEXT_DIM)).astype(np.float16)}
        lines = []
        pattern = str(root / "shards" / source / "t000-%05d.tar")
        writer = webdataset.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0)
        for episode, count in enumerate(counts):
            key = sample_key(source, episode, 0)
            text = f"{source} task {episode % 2}"
            texts.setdefault(text_id(text), generator.standard_normal((3 + episode % 2, TEXT_DIM)).astype(np.float16))
            latents = generator.standard_normal((CHANNELS, count, HEIGHT, WIDTH)).astype(np.float16)
            actions = generator.uniform(-1, 1, (30, count, ACTIONS_PER_FRAME)).astype(np.float32)
            actions[:, 0] = 0
            mask = np.zeros(30, dtype=bool)
            mask[:7] = True
            index_frames = count
            kind = broken.get(key)
            if kind == "nan_latents":
                latents[0, 0, 0, 0] = np.nan
            elif kind == "inf_actions":
                actions[3, -1, 0] = np.inf
            elif kind == "short_actions":
                actions = actions[:, :-1]
            elif kind == "index_frames":
                index_frames = count + 1
            meta = SampleMeta(key, source, episode, 0, 0, 4 * count, 30, 10, text, text_id(text), count,
                              TOKENS_PER_FRAME)
            members = encode_members(latents, actions, mask, meta)
            if kind == "garbage_latents":
                members["latents.npy"] = b"\x93NUMPY not really an array"
            writer.write(members)
            shard = Path(writer.fname)
            prepared.latents[key], prepared.texts[key], prepared.shards[key] = latents, texts[text_id(text)], shard
            lines.append(json.dumps({
                "key": key, "source": source, "shard": str(shard.relative_to(root)), "episode": episode,
                "frames": index_frames, "tokens": index_frames * TOKENS_PER_FRAME,
            }))
        writer.close()
        (root / "index" / source / "t000.jsonl").write_text("\n".join(lines) + "\n")
        save_file({k: torch.from_numpy(v) for k, v in texts.items()}, str(root / "texts" / source / "t000.safetensors"))
    return prepared


def episode_frames(count: int, seed: int, low: int = 3, high: int = 9) -> list[int]:
    return [int(f) for f in np.random.default_rng(seed).integers(low, high + 1, count)]


def make_stream(datasets: list[Path], **overrides) -> PreparedStream:
    """A stream sized for the fixtures: 12 tokens per frame, windows of <= 4 frames, 96-token bins."""
    settings = dict(
        seed=0, patch=PATCH, latent_channels=CHANNELS, text_tokens=TEXT_TOKENS, token_budget=96,
        window_frames=4, chunk_multiple=2, pad_multiple=8, forward_dynamics=False, block_samples=4,
    )
    settings.update(overrides)
    return PreparedStream(datasets, **settings)


def make_loader(datasets: list[Path], *, num_workers: int = 0, **overrides) -> PackedLoader:
    return PackedLoader(make_stream(datasets, **overrides), num_workers=num_workers)


def take(loader: PackedLoader, steps: int) -> list:
    """The next `steps` sequences of a fresh iterator over the loader."""
    iterator = iter(loader)
    return [next(iterator) for _ in range(steps)]

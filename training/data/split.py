"""The held-out split: per source, a fixed set of whole episodes that the training plan never
draws from, for validation during training and for `lbva eval`.

Episodes, not samples, are held out, so no segment of a validation episode is trained on. The
choice depends only on the source's name, its episode numbers and the fraction: the same episodes
are held out on every rank, every restart, every layout and every run seed, so validation numbers of
different runs on one dataset compare.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np

from lbva.errors import UserError

from .index import SourceIndex

log = logging.getLogger("lbva.data")


@dataclass(frozen=True)
class Split:
    train: list[SourceIndex]  # what the training plan draws from
    heldout: list[SourceIndex]  # per source with at least one held-out episode, same order


def heldout_episodes(source: SourceIndex, fraction: float) -> np.ndarray:
    """The sorted episode numbers of `source` held out at `fraction` (of its episodes): round(fraction
    x episodes), at least one when the fraction is positive and the source has two episodes or more."""
    episodes = np.unique(source.episodes)
    if fraction <= 0 or len(episodes) < 2:
        return episodes[:0]
    count = min(max(1, round(fraction * len(episodes))), len(episodes) - 1)
    seed = int.from_bytes(hashlib.sha1(f"heldout:{source.name}".encode()).digest()[:8], "little")
    return np.sort(np.random.default_rng(seed).permutation(episodes)[:count])


def split_sources(sources: list[SourceIndex], fraction: float) -> Split:
    """Split every source into its training and held-out entries (data.validation_fraction)."""
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"data.validation_fraction must lie in [0, 1), got {fraction}")
    if fraction == 0:
        return Split(list(sources), [])
    train, heldout = [], []
    for source in sources:
        held = np.isin(source.episodes, heldout_episodes(source, fraction))
        if not held.any():
            log.warning("source %s has a single episode: nothing of it is held out for validation", source.name)
            train.append(source)
            continue
        train.append(source.subset(np.flatnonzero(~held), "train"))
        heldout.append(source.subset(np.flatnonzero(held), "heldout"))
    return Split(train, heldout)


def heldout_keys(split: Split) -> dict[str, list[str]]:
    """Source name -> the keys of its held-out samples (written to the run folder)."""
    return {source.name: source.keys(np.arange(len(source))) for source in split.heldout}

"""The unified 30-d action space of spec 2.1 and its per-source quantile statistics.

Every robot's action dims map onto slots of one layout: [0:7] left EEF, [7:14] right EEF, [14:21]
left joints, [21:28] right joints, [28] left gripper, [29] right gripper. Slots a source does not fill
stay zero. The model sees quantile-normalised values; data preparation computes the statistics and
inference inverts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lbva.errors import UserError

ACTION_DIM = 30
CLIP = 1.5  # normalised actions beyond the 1%/99% quantiles are clipped here (reference commit f66f602)


@dataclass(frozen=True)
class ActionStats:
    """Per-slot 1% and 99% quantiles of raw actions in the 30-d layout (unused slots 0)."""

    q01: np.ndarray  # [30] float64
    q99: np.ndarray  # [30] float64

    def normalize(self, actions: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Raw [..., 30] -> (a - q01) / (q99 - q01 + 1e-6) * 2 - 1, clipped to +-1.5; slots off `mask` are 0."""
        scaled = (actions - self.q01) / (self.q99 - self.q01 + 1e-6) * 2.0 - 1.0
        return np.where(mask, np.clip(scaled, -CLIP, CLIP), 0.0)

    def to_dict(self) -> dict[str, list[float]]:
        """JSON-ready form: {"q01": [30 floats], "q99": [30 floats]}."""
        return {"q01": [float(x) for x in self.q01], "q99": [float(x) for x in self.q99]}

    @classmethod
    def from_dict(cls, data: dict) -> ActionStats:
        """Inverse of to_dict; raises UserError when either list is missing or not 30 long."""
        try:
            q01 = np.asarray(data["q01"], np.float64)
            q99 = np.asarray(data["q99"], np.float64)
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"action stats need numeric 'q01' and 'q99' lists ({err})") from err
        if q01.shape != (ACTION_DIM,) or q99.shape != (ACTION_DIM,):
            raise UserError(f"action stats need {ACTION_DIM} values in q01 and q99, got {q01.shape} and {q99.shape}")
        return cls(q01, q99)

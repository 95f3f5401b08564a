"""The 30-d action space's statistics: quantile normalisation, clipping, and their JSON form."""

import numpy as np
import pytest

from lbva.errors import UserError
from lbva.models.action_space import ACTION_DIM, ActionStats


def test_quantiles_normalise_to_minus_one_and_one_and_outliers_clip_at_1_5():
    q01, q99 = np.zeros(ACTION_DIM), np.zeros(ACTION_DIM)
    q01[0], q99[0] = -2.0, 2.0
    mask = np.zeros(ACTION_DIM, bool)
    mask[0] = True
    raw = np.zeros((4, ACTION_DIM))
    raw[:, 0] = [-2.0, 2.0, 10.0, -10.0]
    normalized = ActionStats(q01, q99).normalize(raw, mask)
    np.testing.assert_allclose(normalized[:, 0], [-1.0, 1.0, 1.5, -1.5], atol=1e-5)


def test_stats_survive_a_dict_round_trip():
    generator = np.random.default_rng(0)
    q01 = np.zeros(ACTION_DIM)
    q01[[0, 1]] = generator.normal(size=2)
    stats = ActionStats(q01, q01 + np.where(q01 != 0, generator.uniform(0.5, 3.0, ACTION_DIM), 0.0))
    restored = ActionStats.from_dict(stats.to_dict())
    np.testing.assert_array_equal(restored.q01, stats.q01)
    np.testing.assert_array_equal(restored.q99, stats.q99)


def test_stats_with_the_wrong_length_are_a_user_error():
    with pytest.raises(UserError, match="30 values"):
        ActionStats.from_dict({"q01": [0.0] * 29, "q99": [1.0] * 29})

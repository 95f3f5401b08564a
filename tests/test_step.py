"""The training step's plumbing: noise levels per frame, clean history, text dropout, targets."""

import torch
from torch import nn

from helpers import random_sample
from lbva.models.config import get_preset
from lbva.models.masks import CLEAN, NOISY, PADDING
from lbva.models.mot import LingBotVA
from lbva.models.patching import input_to_output_order
from lbva.training.config import ObjectiveConfig
from lbva.training.data.packing import build_packed_sequence, cut_windows
from lbva.training.step import FlowMatchingObjective

CPU = torch.device("cpu")


def _sequence(forward_dynamics=False, seed=0, channels=(0, 1)):
    generator = torch.Generator().manual_seed(seed)
    samples = [random_sample(f"a/{i}", generator, frames=5, height=4, width=4, channels=channels) for i in range(2)]
    windows = [w for s in samples for w in cut_windows(s, 5, 4)]
    return build_packed_sequence(windows, (1, 2, 2), pad_multiple=32, forward_dynamics=forward_dynamics)


class VelocityOracle(nn.Module):
    """Predicts the exact velocity from the noised input it is given and the clean data it was told:
    its loss must be zero if inputs, targets and token orders line up."""

    def __init__(self, seq, garbage_on_unused_channels=False):
        super().__init__()
        self.config = get_preset("tiny-mot")
        self.seq = seq
        self.garbage = garbage_on_unused_channels
        self.last_inputs = None

    def forward(self, inputs, kernels):
        self.last_inputs = inputs
        sigma_v = (inputs.video_timesteps[0] / 1000.0)[:, None]
        sigma_a = (inputs.action_timesteps[0] / 1000.0)[:, None]
        video = torch.where(sigma_v > 0, (inputs.video_tokens[0] - self.seq.video_x0) / sigma_v.clamp(min=1e-8), 0.0)
        action = torch.where(sigma_a > 0, (inputs.action_tokens[0] - self.seq.action_x0) / sigma_a.clamp(min=1e-8), 0.0)
        action = torch.where(self.seq.action_channels, action, 1e3 if self.garbage else action)
        return input_to_output_order(video, self.config.patch_size)[None], action[None]


def _objective(**overrides):
    return FlowMatchingObjective(ObjectiveConfig(**overrides), empty_text=torch.zeros(6, 32))


def test_a_model_predicting_the_true_velocity_has_zero_loss():
    seq = _sequence()
    objective = _objective(noisy_history_prob=0.0)
    draws = objective.draw(seq, torch.Generator().manual_seed(3))
    terms = objective(VelocityOracle(seq), seq, draws, "sdpa", CPU)
    assert terms.video.item() < 1e-8 and terms.action.item() < 1e-8


def test_unused_action_channels_do_not_reach_the_loss():
    seq = _sequence()
    objective = _objective()
    draws = objective.draw(seq, torch.Generator().manual_seed(3))
    terms = objective(VelocityOracle(seq, garbage_on_unused_channels=True), seq, draws, "sdpa", CPU)
    assert terms.action.item() < 1e-8


def test_noisy_tokens_share_one_level_per_frame_and_clean_history_stays_clean():
    seq = _sequence()
    objective = _objective(noisy_history_prob=0.0)
    draws = objective.draw(seq, torch.Generator().manual_seed(5))
    oracle = VelocityOracle(seq)
    objective(oracle, seq, draws, "sdpa", CPU)
    t = oracle.last_inputs.video_timesteps[0]
    expected = objective.video_grid.timesteps[draws.video_index][seq.video_slot]
    noisy = seq.video_role == NOISY
    assert torch.allclose(t[noisy], expected[noisy])
    clean = (seq.video_role == CLEAN) & (seq.video_sample != PADDING)
    assert (t[clean] == 0).all()
    assert torch.equal(oracle.last_inputs.video_tokens[0][clean], seq.video_x0[clean])


def test_noisy_history_noises_the_clean_video_copy_only():
    seq = _sequence()
    objective = _objective(noisy_history_prob=1.0)
    draws = objective.draw(seq, torch.Generator().manual_seed(5))
    oracle = VelocityOracle(seq)
    objective(oracle, seq, draws, "sdpa", CPU)
    clean_video = (seq.video_role == CLEAN) & (seq.video_sample != PADDING)
    assert (oracle.last_inputs.video_timesteps[0][clean_video] > 0).all()
    clean_action = (seq.action_role == CLEAN) & (seq.action_sample != PADDING)
    assert (oracle.last_inputs.action_timesteps[0][clean_action] == 0).all()


def test_text_dropout_replaces_the_whole_text_with_the_empty_embedding():
    seq = _sequence()
    objective = _objective(text_dropout=1.0)
    draws = objective.draw(seq, torch.Generator().manual_seed(0))
    oracle = VelocityOracle(seq)
    objective(oracle, seq, draws, "sdpa", CPU)
    assert (oracle.last_inputs.text == 0).all()


def test_chunk_size_and_window_are_drawn_within_their_ranges():
    seq = _sequence()
    objective = _objective(chunk_size=(2, 3), attention_window=(5, 6))
    for seed in range(20):
        draws = objective.draw(seq, torch.Generator().manual_seed(seed))
        assert draws.chunk_size in (2, 3) and draws.window in (5, 6)


def test_forward_dynamics_loss_is_reported_when_enabled():
    seq = _sequence(forward_dynamics=True)
    objective = _objective(forward_dynamics_weight=0.5)
    draws = objective.draw(seq, torch.Generator().manual_seed(0))
    terms = objective(LingBotVA(get_preset("tiny-mot")), seq, draws, "sdpa", CPU)
    assert terms.forward_dynamics is not None
    expected = terms.video + terms.action + 0.5 * terms.forward_dynamics
    assert torch.isclose(terms.total, expected)


def test_gradients_reach_both_streams():
    seq = _sequence()
    model = LingBotVA(get_preset("tiny-mot"))
    objective = _objective()
    objective(model, seq, objective.draw(seq, torch.Generator().manual_seed(0)), "sdpa", CPU).total.backward()
    assert model.blocks[0].attn1.to_q.weight.grad.abs().sum() > 0
    assert model.action_blocks[0].attn1.to_q.weight.grad.abs().sum() > 0

"""One training step's objective: draw the step's randomness, noise the packed sequence, build
the attention kernels for its layout, run the model and compute the loss terms (spec 2.3, 3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lbva.models.attention import Backend, build_kernels
from lbva.models.masks import CLEAN, NOISY, NOISY_FDM, PADDING, TokenLayout
from lbva.models.mot import LingBotVA, ModelInputs
from lbva.models.patching import input_to_output_order

from .config import ObjectiveConfig
from .objectives import FlowMatchGrid, add_noise, per_frame_weighted_mse, velocity_target
from .packing import PackedSequence


@dataclass
class StepDraws:
    """Everything random about one step, drawn from one generator so a step can be replayed."""

    chunk_size: int
    window: int
    video_index: torch.Tensor  # [G] grid index per frame slot
    action_index: torch.Tensor  # [G]
    history_index: torch.Tensor | None  # [G] noisy-history level per slot, None = clean history
    text_dropped: torch.Tensor  # [S] bool
    video_noise: torch.Tensor  # [Lv, D]
    action_noise: torch.Tensor  # [La, 30]


@dataclass
class LossTerms:
    total: torch.Tensor
    video: torch.Tensor
    action: torch.Tensor
    forward_dynamics: torch.Tensor | None


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    return int(torch.randint(low, high + 1, (1,), generator=generator))


class FlowMatchingObjective:
    def __init__(self, config: ObjectiveConfig, empty_text: torch.Tensor):
        """empty_text [T, text_dim]: the text encoding of "" used for CFG text dropout."""
        self.config = config
        self.video_grid = FlowMatchGrid(config.video_shift)
        self.action_grid = FlowMatchGrid(config.action_shift)
        self.empty_text = empty_text

    def draw(self, seq: PackedSequence, generator: torch.Generator) -> StepDraws:
        c = self.config
        slots = seq.num_slots
        history = None
        if float(torch.rand(1, generator=generator)) < c.noisy_history_prob:
            history = self.video_grid.sample_history_indices(slots, generator)
        return StepDraws(
            chunk_size=_randint(*c.chunk_size, generator),
            window=_randint(*c.attention_window, generator),
            video_index=self.video_grid.sample_indices(slots, generator),
            action_index=self.action_grid.sample_indices(slots, generator),
            history_index=history,
            text_dropped=torch.rand(seq.text.shape[0], generator=generator) < c.text_dropout,
            video_noise=torch.randn(seq.video_x0.shape, generator=generator),
            action_noise=torch.randn(seq.action_x0.shape, generator=generator),
        )

    def __call__(
        self, model: LingBotVA, seq: PackedSequence, draws: StepDraws, backend: Backend, device: torch.device
    ) -> LossTerms:
        seq_dev = {name: getattr(seq, name).to(device) for name in _TENSOR_FIELDS}
        video_sigma, video_t, video_in = self._noised_video(seq_dev, draws, device)
        action_sigma, action_t, action_in = self._noised_actions(seq_dev, draws, device)

        text = torch.where(draws.text_dropped[:, None, None], self.empty_text, seq.text).to(device)
        text_sample = torch.arange(text.shape[0], device=device).repeat_interleave(text.shape[1])
        layout = TokenLayout(
            sample_id=torch.cat([seq_dev["video_sample"], seq_dev["action_sample"]])[None],
            chunk_id=torch.cat([
                2 * (seq_dev["video_frame"] // draws.chunk_size),
                2 * (seq_dev["action_frame"] // draws.chunk_size) + 1,
            ])[None],
            role=torch.cat([seq_dev["video_role"], seq_dev["action_role"]])[None],
            window=draws.window,
        )
        kernels = build_kernels(layout, layout.sample_id, text_sample[None], backend)
        inputs = ModelInputs(
            video_tokens=video_in[None],
            video_timesteps=video_t[None],
            video_positions=seq_dev["video_positions"][None],
            action_tokens=action_in[None],
            action_timesteps=action_t[None],
            action_positions=seq_dev["action_positions"][None],
            text=text.flatten(0, 1)[None],
        )
        video_pred, action_pred = model(inputs, kernels)
        return self._losses(seq, seq_dev, draws, video_pred[0], action_pred[0], model.config.patch_size, device)

    def _noised_video(self, s: dict, draws: StepDraws, device):
        noise = draws.video_noise.to(device)
        slot, role = s["video_slot"], s["video_role"]
        sigma = self.video_grid.sigmas.to(device)[draws.video_index.to(device)][slot]
        if draws.history_index is not None:
            history_sigma = self.video_grid.sigmas.to(device)[draws.history_index.to(device)][slot]
        else:
            history_sigma = torch.zeros_like(sigma)
        sigma = torch.where(role == CLEAN, history_sigma, sigma)
        sigma = torch.where(s["video_sample"] == PADDING, 0.0, sigma)
        return sigma, sigma * 1000.0, add_noise(s["video_x0"], noise, sigma[:, None])

    def _noised_actions(self, s: dict, draws: StepDraws, device):
        noise = draws.action_noise.to(device)
        sigma = self.action_grid.sigmas.to(device)[draws.action_index.to(device)][s["action_slot"]]
        sigma = torch.where((s["action_role"] == CLEAN) | (s["action_sample"] == PADDING), 0.0, sigma)
        noised = add_noise(s["action_x0"], noise, sigma[:, None])
        # Unused channels carry nothing, in the input as in the target (spec 3.2).
        return sigma, sigma * 1000.0, noised * s["action_channels"]

    def _losses(self, seq, s, draws, video_pred, action_pred, patch, device) -> LossTerms:
        video_weight = self.video_grid.weights.to(device)[draws.video_index.to(device)]
        action_weight = self.action_grid.weights.to(device)[draws.action_index.to(device)]
        video_target = input_to_output_order(velocity_target(s["video_x0"], draws.video_noise.to(device)), patch)

        def video_term(role: int) -> torch.Tensor:
            chosen = s["video_role"] == role
            return per_frame_weighted_mse(
                video_pred[chosen], video_target[chosen], torch.ones_like(video_target[chosen], dtype=torch.bool),
                s["video_slot"][chosen], video_weight,
            )

        noisy_actions = s["action_role"] == NOISY
        action_mask = s["action_channels"] & s["action_supervised"][:, None]
        action_target = velocity_target(s["action_x0"], draws.action_noise.to(device)) * s["action_channels"]
        action_loss = per_frame_weighted_mse(
            action_pred[noisy_actions], action_target[noisy_actions], action_mask[noisy_actions],
            s["action_slot"][noisy_actions], action_weight,
        )
        video_loss = video_term(NOISY)
        total = video_loss + self.config.action_weight * action_loss
        fdm_loss = None
        if bool((s["video_role"] == NOISY_FDM).any()):
            fdm_loss = video_term(NOISY_FDM)
            total = total + self.config.forward_dynamics_weight * fdm_loss
        return LossTerms(total=total, video=video_loss, action=action_loss, forward_dynamics=fdm_loss)


_TENSOR_FIELDS = (
    "video_x0", "video_sample", "video_frame", "video_slot", "video_role", "video_positions",
    "action_x0", "action_channels", "action_supervised", "action_sample", "action_frame", "action_slot", "action_role", "action_positions",
)

"""One training step's objective: draw the step's randomness, noise the packed sequence, build
the attention kernels for its layout, run the model and compute the loss terms (spec 2.3, 3)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lbva.models.attention import Backend, build_kernels
from lbva.models.masks import CLEAN, NOISY, NOISY_FDM, PADDING, TokenLayout
from lbva.models.mot import LingBotVA, ModelInputs
from lbva.models.patching import input_to_output_order

from .config import ObjectiveConfig
from .objectives import FlowMatchGrid, add_noise, per_frame_sums, velocity_target, weighted_frame_mean
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


@dataclass
class LossTargets:
    """Per-token loss inputs in the order of the model's outputs (dim 0 shards like the tokens)."""

    video_target: torch.Tensor  # [Lv, pt*ph*pw*C] velocity, patch-major like the video head
    video_role: torch.Tensor  # [Lv]
    video_slot: torch.Tensor  # [Lv]
    action_target: torch.Tensor  # [La, action_dim], zero on unused channels
    action_mask: torch.Tensor  # [La, action_dim] bool: supervised channels of noisy action tokens
    action_slot: torch.Tensor  # [La]
    video_weight: torch.Tensor  # [G] loss weight of each frame slot's drawn noise level
    action_weight: torch.Tensor  # [G]
    forward_dynamics: bool  # whether the whole sequence holds forward-dynamics copies


@dataclass
class StepBatch:
    """One packed sequence ready for the model: inputs, the mask metadata and the loss targets."""

    inputs: ModelInputs  # batch of one
    layout: TokenLayout  # [1, Lv + La], video first
    text_sample: torch.Tensor  # [1, T] sample id of each text token
    targets: LossTargets

    @property
    def num_video(self) -> int:
        return self.inputs.video_tokens.shape[1]

    @property
    def num_action(self) -> int:
        return self.inputs.action_tokens.shape[1]


# (per-frame sums [G], per-frame counts [G]) -> the same over every rank holding part of the frames
FrameReduce = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def no_reduce(sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The FrameReduce of a rank that holds every token of its sequence."""
    return sums, counts


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
        batch = self.prepare(seq, draws, model.config.patch_size, device)
        kernels = build_kernels(batch.layout, batch.layout.sample_id, batch.text_sample, backend)
        video_pred, action_pred = model(batch.inputs, kernels)
        return self.losses(batch.targets, video_pred[0], action_pred[0])

    def prepare(
        self, seq: PackedSequence, draws: StepDraws, patch: tuple[int, int, int], device: torch.device
    ) -> StepBatch:
        """Everything before the model call: noised inputs, the mask metadata, the loss targets.
        Parallel layouts shard (context parallel) or split into microbatches (pipeline) this."""
        s = {name: getattr(seq, name).to(device) for name in _TENSOR_FIELDS}
        _, video_t, video_in = self._noised_video(s, draws, device)
        _, action_t, action_in = self._noised_actions(s, draws, device)
        text = torch.where(draws.text_dropped[:, None, None], self.empty_text, seq.text).to(device)
        text_sample = torch.arange(text.shape[0], device=device).repeat_interleave(text.shape[1])
        layout = TokenLayout(
            sample_id=torch.cat([s["video_sample"], s["action_sample"]])[None],
            chunk_id=torch.cat([
                2 * (s["video_frame"] // draws.chunk_size),
                2 * (s["action_frame"] // draws.chunk_size) + 1,
            ])[None],
            role=torch.cat([s["video_role"], s["action_role"]])[None],
            window=draws.window,
        )
        inputs = ModelInputs(
            video_tokens=video_in[None],
            video_timesteps=video_t[None],
            video_positions=s["video_positions"][None],
            action_tokens=action_in[None],
            action_timesteps=action_t[None],
            action_positions=s["action_positions"][None],
            text=text.flatten(0, 1)[None],
        )
        noisy_actions = (s["action_role"] == NOISY)[:, None]
        targets = LossTargets(
            video_target=input_to_output_order(velocity_target(s["video_x0"], draws.video_noise.to(device)), patch),
            video_role=s["video_role"],
            video_slot=s["video_slot"],
            action_target=velocity_target(s["action_x0"], draws.action_noise.to(device)) * s["action_channels"],
            action_mask=s["action_channels"] & s["action_supervised"][:, None] & noisy_actions,
            action_slot=s["action_slot"],
            video_weight=self.video_grid.weights.to(device)[draws.video_index.to(device)],
            action_weight=self.action_grid.weights.to(device)[draws.action_index.to(device)],
            forward_dynamics=bool((s["video_role"] == NOISY_FDM).any()),
        )
        return StepBatch(inputs, layout, text_sample[None], targets)

    def losses(
        self, targets: LossTargets, video_pred: torch.Tensor, action_pred: torch.Tensor,
        reduce_frames: FrameReduce = no_reduce,
    ) -> LossTerms:
        """The loss terms from predictions [Lv, D] and [La, action_dim] of the tokens `targets`
        holds; reduce_frames completes each term's per-frame sums when those tokens are a shard."""
        frames = targets.video_weight.shape[0]

        def term(prediction, target, element_mask, slot, weight) -> torch.Tensor:
            sums, counts = reduce_frames(*per_frame_sums(prediction, target, element_mask, slot, frames))
            return weighted_frame_mean(sums, counts, weight)

        def video_term(role: int) -> torch.Tensor:
            chosen = (targets.video_role == role)[:, None].expand_as(targets.video_target)
            return term(video_pred, targets.video_target, chosen, targets.video_slot, targets.video_weight)

        video_loss = video_term(NOISY)
        action_loss = term(
            action_pred, targets.action_target, targets.action_mask, targets.action_slot, targets.action_weight
        )
        total = video_loss + self.config.action_weight * action_loss
        fdm_loss = None
        if targets.forward_dynamics:
            fdm_loss = video_term(NOISY_FDM)
            total = total + self.config.forward_dynamics_weight * fdm_loss
        return LossTerms(total=total, video=video_loss, action=action_loss, forward_dynamics=fdm_loss)

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


_TENSOR_FIELDS = (
    "video_x0", "video_sample", "video_frame", "video_slot", "video_role", "video_positions",
    "action_x0", "action_channels", "action_supervised", "action_sample", "action_frame", "action_slot", "action_role", "action_positions",
)

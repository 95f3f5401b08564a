"""One training step's objective: draw the step's randomness, noise the packed sequence, build
the attention kernels for its layout, run the model and compute the loss terms (spec 2.3, 3).

`run_objective` is that sequence, once, for every parallel layout: a layout changes it only
through its hooks (parallelism/step_layout.py StepLayout: kernels, token shards, frame-sum
reduction), and a pipeline runs the model part of it in its schedule with the loss it is handed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from lbva.models.attention import Backend
from lbva.models.flow_schedule import FlowMatchGrid, add_noise, velocity_target
from lbva.models.masks import CLEAN, NOISY, NOISY_FDM, PADDING, TokenLayout
from lbva.models.mot import LingBotVA, ModelInputs
from lbva.models.patching import input_to_output_order
from lbva.parallelism.pipeline import Pipeline, pad_along
from lbva.parallelism.step_layout import FrameReduce, StepLayout, no_reduce, plain_layout

from .config import ObjectiveConfig
from .data.packing import PackedSequence
from .objectives import per_frame_sums, weighted_frame_mean


@dataclass
class StepDraws:
    """Everything random about one packed sequence of a step, drawn from one generator so the step
    can be replayed."""

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


def weighted_terms(terms: Sequence[LossTerms], weights: Sequence[float]) -> LossTerms:
    """Each term's weighted sum over sequences, detached (a pipeline's schedule ran backward
    already; the trainer runs backward per sequence)."""

    def total(values: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
        return torch.stack([value.detach() * weight for value, weight in values]).sum()

    pairs = list(zip(terms, weights, strict=True))
    fdm = [(t.forward_dynamics, w) for t, w in pairs if t.forward_dynamics is not None]
    return LossTerms(
        total=total([(t.total, w) for t, w in pairs]),
        video=total([(t.video, w) for t, w in pairs]),
        action=total([(t.action, w) for t, w in pairs]),
        forward_dynamics=total(fdm) if fdm else None,
    )


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

    @property
    def num_video(self) -> int:
        return self.video_role.shape[0]

    @property
    def num_action(self) -> int:
        return self.action_slot.shape[0]

    def rows(self, video: slice, action: slice) -> LossTargets:
        """The targets of the video tokens `video` and the action tokens `action` (a cp shard)."""
        return replace(
            self,
            video_target=self.video_target[video],
            video_role=self.video_role[video],
            video_slot=self.video_slot[video],
            action_target=self.action_target[action],
            action_mask=self.action_mask[action],
            action_slot=self.action_slot[action],
        )

    def padded(self, num_video: int, num_action: int) -> LossTargets:
        """The targets with loss-free padding rows up to num_video and num_action tokens: clean
        video (no video term reads it) and unsupervised actions."""
        return replace(
            self,
            video_target=pad_along(self.video_target, 0, num_video, 0.0),
            video_role=pad_along(self.video_role, 0, num_video, CLEAN),
            video_slot=pad_along(self.video_slot, 0, num_video, 0),
            action_target=pad_along(self.action_target, 0, num_action, 0.0),
            action_mask=pad_along(self.action_mask, 0, num_action, False),
            action_slot=pad_along(self.action_slot, 0, num_action, 0),
        )


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


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    return int(torch.randint(low, high + 1, (1,), generator=generator))


class FlowMatchingObjective:
    def __init__(self, config: ObjectiveConfig, empty_text: torch.Tensor):
        """empty_text [T, text_dim]: the text encoding of "" used for CFG text dropout."""
        self.config = config
        self.video_grid = FlowMatchGrid(config.video_shift, weighting=config.loss_weighting)
        self.action_grid = FlowMatchGrid(config.action_shift, weighting=config.loss_weighting)
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
        """The loss terms of `seq` through a model that holds every token (run_objective)."""
        return run_objective(self, model, [(seq, draws)], plain_layout(backend), device)

    def prepare(
        self, seq: PackedSequence, draws: StepDraws, patch: tuple[int, int, int], device: torch.device
    ) -> StepBatch:
        """Everything before the model call: noised inputs, the mask metadata, the loss targets.
        Parallel layouts shard (context parallel) or pad into microbatches (pipeline) this."""
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


def run_objective(
    objective: FlowMatchingObjective,
    model: LingBotVA | Pipeline,
    sequences: Sequence[tuple[PackedSequence, StepDraws]],
    layout: StepLayout,
    device: torch.device,
    weights: Sequence[float] | None = None,
) -> LossTerms | None:
    """One step's objective on any layout: prepare each sequence's batch, build its kernels, run
    the model on this rank's tokens, take the losses.

    model: the (parallelized) model, which takes one sequence per step, under `layout`
    (parallelism/parallelize.py step_layout_for); or this rank's Pipeline, which takes a
    microbatch per sequence and runs them under the layout it was built with (pass its `layout`):
    its stages build the kernels, its schedule runs backward and takes the losses on the last
    stage. weights: each microbatch's factor in the loss the schedule runs backward from (default:
    their mean). Returns the loss terms: the sequence's own from a model; from a pipeline their
    weighted sum over microbatches, detached, or None on a rank without the last stage.
    """
    batches = [objective.prepare(seq, draws, model.config.patch_size, device) for seq, draws in sequences]
    if isinstance(model, Pipeline):
        weights = [1.0 / len(batches)] * len(batches) if weights is None else list(weights)
        terms = model.step(batches, objective.losses, weights)
        return None if terms is None else weighted_terms(terms, weights)
    if len(batches) != 1:
        raise ValueError(f"a model without pipeline stages takes one sequence per call, got {len(batches)}")
    batch = batches[0]
    kernels = layout.kernels(batch.layout, batch.text_sample, batch.num_video)
    video_pred, action_pred = model(layout.shard_inputs(batch.inputs), kernels)
    return objective.losses(layout.shard_targets(batch.targets), video_pred[0], action_pred[0], layout.reduce_frames)


def evaluate_objective(
    objective: FlowMatchingObjective,
    model: LingBotVA | Pipeline,
    sequence: tuple[PackedSequence, StepDraws],
    layout: StepLayout,
    device: torch.device,
) -> LossTerms | None:
    """The loss terms of one sequence, forward only (call under torch.no_grad): through the model
    as run_objective does, or through a pipeline's stages without its training schedule (None on
    a pipeline rank without the last stage)."""
    if not isinstance(model, Pipeline):
        return run_objective(objective, model, [sequence], layout, device)
    seq, draws = sequence
    return model.evaluate(objective.prepare(seq, draws, model.config.patch_size, device), objective.losses)

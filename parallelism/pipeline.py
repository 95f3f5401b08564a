"""Pipeline parallelism for LingBot-VA with torch.distributed.pipelining.

A stage holds a contiguous range of depths of BOTH streams (video block i and action block i run
one joint attention, so they stay together); the first stage also holds the embedders, the last
the output heads, and the loss runs on the last stage through the schedule's loss_fn. With v
virtual stages per rank, rank r holds stages r, r + pp, r + 2 pp, ... (the looped placement the
interleaved 1F1B schedule expects); v = 1 runs plain 1F1B.

What crosses a stage boundary, per microbatch (one packed sequence):
- activations (sent point-to-point, with gradients): both streams' hidden states, their per-token
  timestep embeddings (the heads need temb, every block the 6-way modulation projection) and the
  projected text; the projection parameters live on the first stage, so their outputs must travel.
- per-token metadata (passed by the schedule to every stage as keyword arguments, chunked per
  microbatch, no communication): RoPE positions and the mask metadata. Each stage builds its own
  attention kernels from it, so no mask object crosses ranks and a microbatch's mask exists only
  while that microbatch is in flight; the price is one mask build per stage and microbatch, which
  is elementwise work, small next to the attention it masks.
Stages need one activation shape for every microbatch, so a step's sequences are padded to the
longest video part, action part and text (padding is loss-neutral, `pad_step_batch`). The schedule
fixes its activation shapes the first time it runs (by running the first microbatch once), so a
step with other shapes builds new stages and a new schedule and pays that inference run again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor, Replicate

from lbva.models.attention import AttentionKernels, Backend, build_kernels
from lbva.models.masks import CLEAN, PADDING, TokenLayout
from lbva.models.mot import LingBotVA, ModelInputs, run_depths
from lbva.training.step import FlowMatchingObjective, LossTargets, LossTerms, StepBatch, no_reduce

from .context_parallel import ContextParallel, frame_reduce, shard_inputs, shard_targets, ulysses_kernels
from .mesh import ParallelConfig, ParallelMesh
from .parallelize import parallelize

# (full-sequence layout [1, L], text sample ids [1, T], video tokens in the full sequence) -> kernels
KernelBuilder = Callable[[TokenLayout, torch.Tensor, int], AttentionKernels]


class DepthRange(nn.Module):
    """The blocks of a contiguous depth range, registered under their depth in the full model (so
    parameter names, and checkpoints, do not depend on the pipeline layout) and iterated in order
    like the full model's ModuleList."""

    def __init__(self, blocks: nn.ModuleList, layers: range):
        super().__init__()
        for depth in layers:
            self.add_module(str(depth), blocks[depth])

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)


class MoTStage(nn.Module):
    """Depths `layers` of LingBotVA (both streams), plus the embedders on the first stage and the
    heads on the last, under the full model's names. It has the attributes the parallel wrappers
    read (blocks, action_blocks, config), so `parallelize` applies to it as to the whole model."""

    def __init__(self, model: LingBotVA, layers: range, first: bool, last: bool, kernels: KernelBuilder):
        super().__init__()
        self.config = model.config
        self.first, self.last = first, last
        self.make_kernels = kernels
        self.rope = model.rope
        if first:
            self.patch_embedding_mlp = model.patch_embedding_mlp
            self.action_embedder = model.action_embedder
            self.condition_embedder = model.condition_embedder
            self.condition_embedder_action = model.condition_embedder_action
        self.blocks = DepthRange(model.blocks, layers)
        self.action_blocks = None if model.action_blocks is None else DepthRange(model.action_blocks, layers)
        if last:
            self.proj_out = model.proj_out
            self.action_proj_out = model.action_proj_out
            self.scale_shift_table = model.scale_shift_table
            self.action_scale_shift_table = model.action_scale_shift_table
            self.head = model.head
            self.action_head = model.action_head

    def forward(
        self,
        *activations: torch.Tensor,
        video_positions: torch.Tensor,
        action_positions: torch.Tensor,
        sample_id: torch.Tensor,
        chunk_id: torch.Tensor,
        role: torch.Tensor,
        window: torch.Tensor,
        text_sample: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """First stage: (video_tokens, video_timesteps, action_tokens, action_timesteps, text) as in
        ModelInputs; later stages: the previous stage's outputs. Last stage returns the two
        predictions, the others (x_video, x_action, temb_video, temb_action, proj_video,
        proj_action, text). Keywords: this microbatch's positions and mask metadata."""
        if self.first:
            video_tokens, video_timesteps, action_tokens, action_timesteps, text = activations
            x_video = self.patch_embedding_mlp(video_tokens)
            x_action = self.action_embedder(action_tokens)
            temb_video, proj_video = self.condition_embedder(video_timesteps)
            temb_action, proj_action = self.condition_embedder_action(action_timesteps)
            text = self.condition_embedder.text_embedder(text)
        else:
            x_video, x_action, temb_video, temb_action, proj_video, proj_action, text = activations

        layout = TokenLayout(sample_id, chunk_id, role, int(window))
        # Under context parallelism positions are this rank's shard and the layout is the whole
        # sequence; both parts shard by the same factor.
        shards = layout.length // (video_positions.shape[1] + action_positions.shape[1])
        kernels = self.make_kernels(layout, text_sample, video_positions.shape[1] * shards)
        rope_video, rope_action = self.rope(video_positions), self.rope(action_positions)
        x_video, x_action = run_depths(
            self.blocks, self.action_blocks, x_video, x_action, proj_video, proj_action, rope_video, rope_action,
            text, kernels,
        )

        if not self.last:
            return x_video, x_action, temb_video, temb_action, proj_video, proj_action, text
        video_out = self.head(x_video, temb_video, self.scale_shift_table, self.proj_out)
        action_table = self.action_scale_shift_table
        if action_table is None:  # the shared layout's heads share one table
            action_table = self.scale_shift_table
        return video_out, self.action_head(x_action, temb_action, action_table, self.action_proj_out)


def _pad(tensor: torch.Tensor, dim: int, length: int, value) -> torch.Tensor:
    extra = length - tensor.shape[dim]
    if extra < 0:
        raise ValueError(f"cannot pad a dimension of {tensor.shape[dim]} down to {length}")
    if extra == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = extra
    return torch.cat([tensor, tensor.new_full(shape, value)], dim=dim)


def pad_step_batch(batch: StepBatch, num_video: int, num_action: int, num_text: int) -> StepBatch:
    """Extend the video part, the action part and the text with padding. Padding tokens see only
    themselves, no real token sees them or padded text, and they carry no loss, so the losses and
    gradients are those of the unpadded batch."""
    lv, la = batch.num_video, batch.num_action
    inputs, layout, targets = batch.inputs, batch.layout, batch.targets

    def split_pad(tensor: torch.Tensor, value) -> torch.Tensor:
        return torch.cat([_pad(tensor[:, :lv], 1, num_video, value), _pad(tensor[:, lv:], 1, num_action, value)], dim=1)

    return StepBatch(
        inputs=ModelInputs(
            video_tokens=_pad(inputs.video_tokens, 1, num_video, 0.0),
            video_timesteps=_pad(inputs.video_timesteps, 1, num_video, 0.0),
            video_positions=_pad(inputs.video_positions, 1, num_video, 0.0),
            action_tokens=_pad(inputs.action_tokens, 1, num_action, 0.0),
            action_timesteps=_pad(inputs.action_timesteps, 1, num_action, 0.0),
            action_positions=_pad(inputs.action_positions, 1, num_action, 0.0),
            text=_pad(inputs.text, 1, num_text, 0.0),
        ),
        layout=TokenLayout(
            sample_id=split_pad(layout.sample_id, PADDING),
            chunk_id=split_pad(layout.chunk_id, 0),
            role=split_pad(layout.role, CLEAN),
            window=layout.window,
        ),
        text_sample=_pad(batch.text_sample, 1, num_text, PADDING),
        targets=replace(
            targets,
            video_target=_pad(targets.video_target, 0, num_video, 0.0),
            video_role=_pad(targets.video_role, 0, num_video, CLEAN),
            video_slot=_pad(targets.video_slot, 0, num_video, 0),
            action_target=_pad(targets.action_target, 0, num_action, 0.0),
            action_mask=_pad(targets.action_mask, 0, num_action, False),
            action_slot=_pad(targets.action_slot, 0, num_action, 0),
        ),
    )


def stage_layers(num_layers: int, num_stages: int, stage: int) -> range:
    """The depths stage `stage` of `num_stages` holds: an equal contiguous range."""
    if num_layers % num_stages:
        raise ValueError(f"{num_stages} pipeline stages do not divide {num_layers} layers")
    per_stage = num_layers // num_stages
    return range(stage * per_stage, (stage + 1) * per_stage)


def build_stages(
    model: LingBotVA, pp_rank: int, pp_size: int, virtual_stages: int, backend: Backend,
    cp: ContextParallel | None = None,
) -> list[tuple[int, MoTStage]]:
    """This pp rank's stages as (stage index, module): ranks hold stages rank, rank + pp, ...
    The modules share parameters with `model`; parallelize each before building the Pipeline."""
    num_stages = pp_size * virtual_stages

    def plain(layout: TokenLayout, text_sample: torch.Tensor, num_video: int) -> AttentionKernels:
        return build_kernels(layout, layout.sample_id, text_sample, backend)

    def ulysses(layout: TokenLayout, text_sample: torch.Tensor, num_video: int) -> AttentionKernels:
        return ulysses_kernels(layout, text_sample, num_video, cp, backend)

    stages = []
    for stage in range(pp_rank, num_stages, pp_size):
        layers = stage_layers(model.config.num_layers, num_stages, stage)
        module = MoTStage(model, layers, stage == 0, stage == num_stages - 1, plain if cp is None else ulysses)
        stages.append((stage, module))
    return stages


def build_pipeline(
    model: LingBotVA, mesh: ParallelMesh, config: ParallelConfig, objective: FlowMatchingObjective, backend: Backend
) -> Pipeline:
    """Split `model` into this pp rank's stages, lay each out over the rest of the mesh with
    `parallelize` (TP, activation checkpointing, compile, FSDP; torchtitan's order: split first,
    so each stage's FSDP root and TP boundaries are its own) and return the Pipeline that runs them.
    Under cp > 1 the stages attend through Ulysses."""
    dims = mesh.dims
    cp = ContextParallel.from_mesh(mesh) if dims.cp_enabled else None
    pp_mesh = mesh["pp"]
    stages = build_stages(model, pp_mesh.get_local_rank(), dims.pp, config.pp_virtual_stages, backend, cp)
    for index, stage in stages:
        parallelize(stage, mesh, config)
        if dims.tp_enabled and index > 0:
            _receive_replicated(stage, mesh["tp"])
    return Pipeline(stages, dims.pp * config.pp_virtual_stages, pp_mesh.get_group(), mesh.device_type, objective, cp)


def _receive_replicated(stage: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Under TP every tp rank of a later stage receives the same full activations. Hand them to
    the stage as Replicate DTensors, the form the first stage's embedders produce them in, so the
    stage's first depth takes its sequence shard and the heads mix them with replicated weights."""

    def replicated(_: nn.Module, activations: tuple[torch.Tensor, ...]) -> tuple[DTensor, ...]:
        return tuple(DTensor.from_local(a, tp_mesh, [Replicate()], run_check=False) for a in activations)

    stage.register_forward_pre_hook(replicated)


class Pipeline:
    """This rank's stages and the schedule that runs one optimizer step's microbatches through
    them: 1F1B with one stage per rank, interleaved 1F1B with several."""

    def __init__(
        self,
        stages: list[tuple[int, nn.Module]],
        num_stages: int,
        group: dist.ProcessGroup,
        device: torch.device | str,
        objective: FlowMatchingObjective,
        cp: ContextParallel | None = None,
    ):
        self.stages = stages
        self.model_parts = [module for _, module in stages]
        self.num_stages = num_stages
        self.group = group
        self.device = torch.device(device)
        self.objective = objective
        self.cp = cp
        self.holds_last_stage = any(index == num_stages - 1 for index, _ in stages)
        self._schedule = None
        self._schedule_key: tuple | None = None

    def step(self, batches: list[StepBatch]) -> LossTerms | None:
        """Forward and backward of every microbatch (one packed sequence each, as the objective's
        prepare made them, whole even under cp); gradients accumulate as the mean over microbatches, as
        the schedule's scale_grads divides by their number. Returns the microbatch mean of the
        loss terms where the last stage lives, None elsewhere."""
        args, kwargs, targets = self._microbatch_inputs(batches)
        schedule = self._schedule_for(args, kwargs, len(batches))
        terms_of: dict[int, LossTerms] = {}
        schedule.step(
            *args, target=torch.arange(len(batches)), return_outputs=False,
            loss_kwargs={"targets": targets, "terms_of": terms_of}, **kwargs,
        )
        if not self.holds_last_stage:
            return None
        terms = list(terms_of.values())
        fdm = [t.forward_dynamics for t in terms if t.forward_dynamics is not None]
        return LossTerms(
            total=torch.stack([t.total for t in terms]).mean(),
            video=torch.stack([t.video for t in terms]).mean(),
            action=torch.stack([t.action for t in terms]).mean(),
            forward_dynamics=torch.stack(fdm).mean() if fdm else None,
        )

    def _loss(
        self, output: tuple[torch.Tensor, torch.Tensor], microbatch: torch.Tensor, targets: list[LossTargets],
        terms_of: dict[int, LossTerms],
    ) -> torch.Tensor:
        """The schedule's loss_fn: one microbatch's total loss; its terms go to terms_of, keyed by
        microbatch because the schedule also calls this while inferring gradient shapes."""
        video_pred, action_pred = output
        index = int(microbatch)
        reduce = no_reduce if self.cp is None else frame_reduce(self.cp)
        terms = self.objective.losses(targets[index], video_pred[0], action_pred[0], reduce)
        terms_of[index] = LossTerms(*(None if t is None else t.detach() for t in vars(terms).values()))
        return terms.total

    def _microbatch_inputs(self, batches: list[StepBatch]) -> tuple[tuple, dict, list[LossTargets]]:
        """Pad the microbatches to one shape, shard them under cp and stack them along the batch
        dim, which the schedule splits back into microbatches."""
        num_video = max(b.num_video for b in batches)
        num_action = max(b.num_action for b in batches)
        num_text = max(b.inputs.text.shape[1] for b in batches)
        padded = [pad_step_batch(b, num_video, num_action, num_text) for b in batches]
        inputs = [b.inputs if self.cp is None else shard_inputs(b.inputs, self.cp) for b in padded]
        targets = [b.targets if self.cp is None else shard_targets(b.targets, self.cp) for b in padded]

        def stacked(get) -> torch.Tensor:
            return torch.cat([get(x) for x in inputs])

        args = tuple(
            stacked(lambda x, name=name: getattr(x, name))
            for name in ("video_tokens", "video_timesteps", "action_tokens", "action_timesteps", "text")
        )
        kwargs = {
            "video_positions": stacked(lambda x: x.video_positions),
            "action_positions": stacked(lambda x: x.action_positions),
            "sample_id": torch.cat([b.layout.sample_id for b in padded]),
            "chunk_id": torch.cat([b.layout.chunk_id for b in padded]),
            "role": torch.cat([b.layout.role for b in padded]),
            # Read as a Python int by each stage: kept on the CPU so that costs no device sync.
            "window": torch.tensor([b.layout.window for b in padded]),
            "text_sample": torch.cat([b.text_sample for b in padded]),
        }
        return args, kwargs, targets

    def _schedule_for(self, args: tuple, kwargs: dict, num_microbatches: int):
        """The schedule for these shapes: the one of the last step, or new stages and a new
        schedule (stages wrap the same modules and hold no parameters of their own)."""
        key = (num_microbatches, *(t.shape for t in args), *(t.shape for t in kwargs.values()))
        if key != self._schedule_key:
            stages = [
                PipelineStage(module, index, self.num_stages, self.device, group=self.group)
                for index, module in self.stages
            ]
            if len(stages) == 1:
                self._schedule = Schedule1F1B(stages[0], num_microbatches, loss_fn=self._loss)
            else:
                self._schedule = ScheduleInterleaved1F1B(stages, num_microbatches, loss_fn=self._loss)
            self._schedule_key = key
        return self._schedule

"""Pipeline parallelism for LingBot-VA with torch.distributed.pipelining.

A stage holds a contiguous range of depths of BOTH streams (video block i and action block i run
one joint attention, so they stay together); the first stage also holds the embedders, the last
the output heads, and the loss runs on the last stage through the schedule's loss_fn. With v
virtual stages per rank, rank r holds stages r, r + pp, r + 2 pp, ... (the looped placement the
interleaved 1F1B schedule expects); v = 1 runs plain 1F1B.

A stage is built from the model's own pieces (models/mot.py ModelPieces): the first embeds, each
runs its depths, the last applies the heads, all under the full model's parameter names.

What crosses a stage boundary, per microbatch (one packed sequence):
- activations (sent point-to-point, with gradients): the DepthState's tensors but the RoPE tables,
  i.e. the residual streams, their timestep projections (every block's modulation input), the
  heads' timestep embeddings and the projected text; the projection parameters live on the first
  stage, so their outputs must travel.
- per-token metadata (passed by the schedule to every stage as keyword arguments, chunked per
  microbatch, no communication): RoPE positions and the mask metadata. Each stage builds its own
  attention kernels from it with the step layout's kernel builder, so no mask object crosses ranks
  and a microbatch's mask exists only while that microbatch is in flight; the price is one mask
  build per stage and microbatch, which is elementwise work, small next to the attention it masks.
Stages need one activation shape for every microbatch, so a step's sequences are padded to the
longest video part, action part and text (padding is loss-neutral, `pad_step_batch`). The schedule
fixes its activation shapes the first time it runs (by running the first microbatch once), so a
step with other shapes builds new stages and a new schedule and pays that inference run again.
The loss comes from the caller (training/step.py), taken on the last stage through the schedule's
loss_fn with the step layout's frame reduction and each microbatch's weight (the schedule scales
nothing). The evaluation loss runs one microbatch forward only through a schedule of its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleLoopedBFS,
)
from torch.distributed.tensor import DTensor, Replicate

from lbva.models.blocks import DepthState
from lbva.models.masks import CLEAN, PADDING, TokenLayout
from lbva.models.mot import EMBEDDING_PARTS, HEAD_PARTS, LingBotVA, ModelInputs, ModelPieces, TimestepEmbeddings

from .mesh import ParallelConfig, ParallelMesh
from .parallelize import parallelize
from .step_layout import KernelBuilder, LossFn, StepLayout, TargetedBatch


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


class MoTStage(ModelPieces):
    """Depths `layers` of LingBotVA (both streams), plus the embedders on the first stage and the
    heads on the last, under the full model's names. It runs the model's own pieces and lists its
    depths as the model does, so `parallelize` applies to it as to the whole model."""

    def __init__(self, model: LingBotVA, layers: range, first: bool, last: bool, kernels: KernelBuilder):
        super().__init__()
        self.config = model.config
        self.first, self.last = first, last
        self.make_kernels = kernels
        self.rope = model.rope
        for name in (EMBEDDING_PARTS if first else ()) + (HEAD_PARTS if last else ()):
            setattr(self, name, getattr(model, name))
        for name, blocks in model.block_stacks().items():
            setattr(self, name, DepthRange(blocks, layers))

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
        ModelInputs; later stages: the previous stage's outputs. The last stage returns the two
        predictions, the others the state's tensors (`_boundary`). Keywords: this microbatch's
        positions and mask metadata."""
        if self.first:
            video_tokens, video_timesteps, action_tokens, action_timesteps, text = activations
            state, temb = self.embed(ModelInputs(
                video_tokens, video_timesteps, video_positions, action_tokens, action_timesteps, action_positions, text
            ))
        else:
            state, temb = _received(activations, self.stream_rope(video_positions, action_positions))

        layout = TokenLayout(sample_id, chunk_id, role, int(window))
        # Under context parallelism positions are this rank's shard and the layout is the whole
        # sequence; both parts shard by the same factor.
        shards = layout.length // (video_positions.shape[1] + action_positions.shape[1])
        state = self.run_depths(state, self.make_kernels(layout, text_sample, video_positions.shape[1] * shards))
        return self.heads(state, temb) if self.last else _boundary(state, temb)


class StageGroup(nn.Module):
    """Several stages of one rank seen as one module under the full model's names: their
    embedders, heads and parameters, and per block stack one DepthRange of all their depths. The
    optimizer, the checkpoint's state dict and the final weights take it where they take a model;
    it runs nothing itself (the schedule runs the stages)."""

    def __init__(self, parts: Sequence[MoTStage]):
        super().__init__()
        self.config = parts[0].config
        for part in parts:
            for name, param in part.named_parameters(recurse=False):
                self.register_parameter(name, param)
            for name, child in part.named_children():
                if isinstance(child, DepthRange):
                    if name not in self._modules:
                        self.add_module(name, DepthRange(nn.ModuleList(), range(0)))
                    for depth, block in child.named_children():
                        self._modules[name].add_module(depth, block)
                elif name not in self._modules:
                    self.add_module(name, child)


def _boundary(state: DepthState, temb: TimestepEmbeddings) -> tuple[torch.Tensor, ...]:
    """What a stage sends on: the state but its RoPE tables, which the next stage rebuilds, and
    the heads' timestep embeddings."""
    return (*state.streams, *state.timestep_proj, state.text, *temb)


def _received(activations: tuple[torch.Tensor, ...], rope: tuple) -> tuple[DepthState, TimestepEmbeddings]:
    """What a stage receives (`_boundary`'s tensors), with the RoPE tables of its streams."""
    streams = len(rope)
    *per_stream, text, temb_video, temb_action = activations
    state = DepthState(tuple(per_stream[:streams]), tuple(per_stream[streams:]), rope, text)
    return state, TimestepEmbeddings(temb_video, temb_action)


def pad_along(tensor: torch.Tensor, dim: int, length: int, value) -> torch.Tensor:
    """`tensor` extended along `dim` to `length` entries of `value`."""
    extra = length - tensor.shape[dim]
    if extra < 0:
        raise ValueError(f"cannot pad a dimension of {tensor.shape[dim]} down to {length}")
    if extra == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = extra
    return torch.cat([tensor, tensor.new_full(shape, value)], dim=dim)


Batch = TypeVar("Batch", bound=TargetedBatch)


def pad_step_batch(batch: Batch, num_video: int, num_action: int, num_text: int) -> Batch:
    """Extend the video part, the action part and the text with padding. Padding tokens see only
    themselves, no real token sees them or padded text, and they carry no loss, so the losses and
    gradients are those of the unpadded batch."""
    inputs, layout = batch.inputs, batch.layout
    lv = inputs.video_tokens.shape[1]

    def split_pad(tensor: torch.Tensor, value) -> torch.Tensor:
        video, action = tensor[:, :lv], tensor[:, lv:]
        return torch.cat([pad_along(video, 1, num_video, value), pad_along(action, 1, num_action, value)], dim=1)

    return replace(
        batch,
        inputs=ModelInputs(
            video_tokens=pad_along(inputs.video_tokens, 1, num_video, 0.0),
            video_timesteps=pad_along(inputs.video_timesteps, 1, num_video, 0.0),
            video_positions=pad_along(inputs.video_positions, 1, num_video, 0.0),
            action_tokens=pad_along(inputs.action_tokens, 1, num_action, 0.0),
            action_timesteps=pad_along(inputs.action_timesteps, 1, num_action, 0.0),
            action_positions=pad_along(inputs.action_positions, 1, num_action, 0.0),
            text=pad_along(inputs.text, 1, num_text, 0.0),
        ),
        layout=TokenLayout(
            sample_id=split_pad(layout.sample_id, PADDING),
            chunk_id=split_pad(layout.chunk_id, 0),
            role=split_pad(layout.role, CLEAN),
            window=layout.window,
        ),
        text_sample=pad_along(batch.text_sample, 1, num_text, PADDING),
        targets=batch.targets.padded(num_video, num_action),
    )


def stage_layers(num_layers: int, num_stages: int, stage: int) -> range:
    """The depths stage `stage` of `num_stages` holds: an equal contiguous range."""
    if num_layers % num_stages:
        raise ValueError(f"{num_stages} pipeline stages do not divide {num_layers} layers")
    per_stage = num_layers // num_stages
    return range(stage * per_stage, (stage + 1) * per_stage)


def build_stages(
    model: LingBotVA, pp_rank: int, pp_size: int, virtual_stages: int, kernels: KernelBuilder
) -> list[tuple[int, MoTStage]]:
    """This pp rank's stages as (stage index, module): ranks hold stages rank, rank + pp, ...
    The modules share parameters with `model`; parallelize each before building the Pipeline.
    kernels: the step layout's kernel builder, which every stage attends through."""
    num_stages = pp_size * virtual_stages
    stages = []
    for stage in range(pp_rank, num_stages, pp_size):
        layers = stage_layers(model.config.num_layers, num_stages, stage)
        stages.append((stage, MoTStage(model, layers, stage == 0, stage == num_stages - 1, kernels)))
    return stages


def build_pipeline(model: LingBotVA, mesh: ParallelMesh, config: ParallelConfig, layout: StepLayout) -> Pipeline:
    """Split `model` into this pp rank's stages, lay each out over the rest of the mesh with
    `parallelize` (TP, activation checkpointing, compile, FSDP; torchtitan's order: split first,
    so each stage's FSDP root and TP boundaries are its own) and return the Pipeline that runs them
    under the step layout `layout` (parallelize.step_layout_for: under cp > 1 the stages attend
    through Ulysses)."""
    dims = mesh.dims
    pp_mesh = mesh["pp"]
    stages = build_stages(model, pp_mesh.get_local_rank(), dims.pp, config.pp_virtual_stages, layout.kernels)
    for index, stage in stages:
        parallelize(stage, mesh, config)
        if dims.tp_enabled and index > 0:
            _receive_replicated(stage, mesh["tp"])
    return Pipeline(stages, dims.pp * config.pp_virtual_stages, pp_mesh.get_group(), mesh.device_type, layout)


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
        stages: list[tuple[int, MoTStage]],
        num_stages: int,
        group: dist.ProcessGroup,
        device: torch.device | str,
        layout: StepLayout,
    ):
        self.stages = stages
        self.model_parts = [module for _, module in stages]
        self.config = self.model_parts[0].config
        self.num_stages = num_stages
        self.group = group
        self.device = torch.device(device)
        self.layout = layout
        self.holds_last_stage = any(index == num_stages - 1 for index, _ in stages)
        # This rank's share of the model as one module (the optimizer's and the checkpoint's).
        self.module = self.model_parts[0] if len(self.model_parts) == 1 else StageGroup(self.model_parts)
        self._schedule = None
        self._schedule_key: tuple | None = None
        self._eval_schedule = None
        self._eval_key: tuple | None = None

    def step(self, batches: Sequence[TargetedBatch], loss: LossFn, weights: Sequence[float]) -> list | None:
        """Forward and backward of every microbatch (one packed sequence each, whole even under
        cp); gradients accumulate as the sum over microbatches of weights[i] x microbatch i's
        total (the schedule scales nothing). loss(targets, video_pred, action_pred,
        reduce_frames) -> terms runs on the last stage. Returns each microbatch's (unweighted)
        terms, in microbatch order, where the last stage lives; None elsewhere."""
        args, kwargs, targets = self._microbatch_inputs(batches)
        schedule = self._schedule_for(args, kwargs, len(batches))
        terms_of: dict[int, object] = {}
        schedule.step(
            *args, target=torch.arange(len(batches)), return_outputs=False,
            loss_kwargs={"targets": targets, "terms_of": terms_of, "loss": loss, "weights": list(weights)}, **kwargs,
        )
        if not self.holds_last_stage:
            return None
        return [terms_of[index] for index in sorted(terms_of)]

    def evaluate(self, batch: TargetedBatch, loss: LossFn):
        """One microbatch forward only through the stages (call under torch.no_grad), with a
        schedule of its own so the training schedule keeps its shapes. Returns the loss terms on
        the rank with the last stage, None elsewhere."""
        args, kwargs, targets = self._microbatch_inputs([batch])
        key = (*(t.shape for t in args), *(t.shape for t in kwargs.values()))
        if key != self._eval_key:
            stages = self._pipeline_stages()
            self._eval_schedule = (
                ScheduleGPipe(stages[0], 1, loss_fn=self._loss) if len(stages) == 1
                else ScheduleLoopedBFS(stages, 1, loss_fn=self._loss)
            )
            self._eval_key = key
        terms_of: dict[int, object] = {}
        self._eval_schedule.eval(
            *args, target=torch.zeros(1, dtype=torch.long),
            loss_kwargs={"targets": targets, "terms_of": terms_of, "loss": loss, "weights": [1.0]}, **kwargs,
        )
        return terms_of[0] if self.holds_last_stage else None

    def _loss(
        self, output: tuple[torch.Tensor, torch.Tensor], microbatch: torch.Tensor, targets: list, terms_of: dict,
        loss: LossFn, weights: list[float],
    ) -> torch.Tensor:
        """The schedule's loss_fn: one microbatch's weighted total loss; its terms go to terms_of,
        keyed by microbatch because the schedule also calls this while inferring gradient shapes."""
        video_pred, action_pred = output
        index = int(microbatch)
        terms = loss(targets[index], video_pred[0], action_pred[0], self.layout.reduce_frames)
        terms_of[index] = terms
        return terms.total * weights[index]

    def _microbatch_inputs(self, batches: Sequence[TargetedBatch]) -> tuple[tuple, dict, list]:
        """Pad the microbatches to one shape, take this rank's token shards (cp) and stack them
        along the batch dim, which the schedule splits back into microbatches."""
        num_video = max(b.inputs.video_tokens.shape[1] for b in batches)
        num_action = max(b.inputs.action_tokens.shape[1] for b in batches)
        num_text = max(b.inputs.text.shape[1] for b in batches)
        padded = [pad_step_batch(b, num_video, num_action, num_text) for b in batches]
        inputs = [self.layout.shard_inputs(b.inputs) for b in padded]
        targets = [self.layout.shard_targets(b.targets) for b in padded]

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
            stages = self._pipeline_stages()
            if len(stages) == 1:
                self._schedule = Schedule1F1B(stages[0], num_microbatches, loss_fn=self._loss, scale_grads=False)
            else:
                self._schedule = ScheduleInterleaved1F1B(
                    stages, num_microbatches, loss_fn=self._loss, scale_grads=False
                )
            self._schedule_key = key
        return self._schedule

    def _pipeline_stages(self) -> list[PipelineStage]:
        return [
            PipelineStage(module, index, self.num_stages, self.device, group=self.group) for index, module in self.stages
        ]

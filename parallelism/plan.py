"""Memory per GPU and predicted step time of candidate parallel layouts (the estimates behind
`lbva plan`, whose command line is plan_cli.py).

For a model preset, a cluster and a workload, every layout (pp, dp_replicate, dp_shard, cp, tp) the
mesh rules allow is estimated; those that fit in memory are ranked by predicted tokens/s/GPU.
The model of a step (see `memory_estimate` and `step_estimate`):

- Parameters, gradients and AdamW m, v are fp32 and sharded by FSDP2 over dp_shard x cp (CP ranks
  hold the same weights), block weights also over tp; the first pipeline stage also holds every
  weight outside the blocks. With FSDP2's MixedPrecisionPolicy(param=bf16, reduce=fp32) the sharded
  fp32 parameter is the master copy, so there is no separate one: 16 bytes per sharded parameter.
  With one micro-batch per step the gradients fill in while backward frees the activations, so
  only the larger of the two counts. An EMA of the weights (optim.ema_decay > 0) adds one fp32
  copy sharded like the parameters: 4 more bytes per sharded parameter.
- Activations per token per layer are counted tensor by tensor from models/blocks.py (what autograd
  keeps for backward, fp32 where the block computes in fp32), divided by cp (Ulysses shards the
  sequence, or the heads inside attention) and by tp (heads, FFN hidden, or sequence under sequence
  parallelism), except the inputs of column-parallel linears, which TP all-gathers and keeps.
- Step time = model FLOPs (parallelism/flops.py) plus recompute over peak x efficiency, plus the
  communication that cannot hide behind compute, stretched by the pipeline bubble.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

from lbva.models.config import ModelConfig
from lbva.models.info import build_on_meta, parameter_counts
from lbva.errors import UserError

from .flops import SequenceMix, forward_flops, mean_attended_keys
from .mesh import ParallelConfig, ParallelDims

GiB = 1024**3
Checkpointing = Literal["none", "selective", "full"]
# Kept free of the estimate: CUDA context, NCCL buffers and allocator fragmentation.
MEMORY_HEADROOM = 0.10


@dataclass(frozen=True)
class GPUType:
    name: str
    peak_bf16_tflops: float  # dense
    memory_gib: float  # what torch sees as total memory
    intra_node_gbps: float  # NVLink, per GPU and direction
    inter_node_gbps: float  # network, per GPU and direction


GPU_TYPES = {
    # SXM parts: NVLink 4 is 900 GB/s both directions, one 400 Gb/s NIC per GPU.
    "H100": GPUType("H100", 989.0, 79.0, 450.0, 50.0),
    "H200": GPUType("H200", 989.0, 139.0, 450.0, 50.0),
    # NVLink 3 is 600 GB/s both directions, one 200 Gb/s NIC per GPU.
    "A100": GPUType("A100", 312.0, 79.0, 300.0, 25.0),
}


@dataclass(frozen=True)
class Cluster:
    gpu: GPUType
    gpus_per_node: int
    nodes: int
    intra_node_gbps: float
    inter_node_gbps: float

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class Workload:
    """One optimizer step. Every GPU contributes sequences_per_gpu packed sequences, so a model
    replica of pp x cp x tp GPUs runs sequences_per_gpu x pp x cp x tp micro-batches of one
    sequence each (pipeline micro-batches, or gradient accumulation without PP).
    Activation checkpointing as in parallelism/activation_checkpoint.py: "full" recomputes every
    depth, "selective" every `checkpoint_every`-th (depths 0, k, 2k, ...).
    precision "fp32" and attention "sdpa" (dense masks) describe the single-process CPU trainer."""

    mix: SequenceMix = field(default_factory=SequenceMix)
    sequences_per_gpu: float = 1  # fractional when a replica's tp x cp x pp GPUs share one sequence
    activation_checkpointing: Checkpointing = "full"
    checkpoint_every: int = 2
    precision: Literal["bf16", "fp32"] = "bf16"
    attention: Literal["flex", "sdpa"] = "flex"
    efficiency: float = 0.55  # achieved fraction of peak on the compute itself
    ema: bool = False  # an fp32 EMA of the weights (training/ema.py), sharded like the parameters


@dataclass(frozen=True)
class Layout:
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    virtual_stages: int = 1  # > 1: interleaved 1F1B

    @property
    def schedule(self) -> str:
        if self.pp == 1:
            return "-"
        return "1F1B" if self.virtual_stages == 1 else f"interleaved x{self.virtual_stages}"


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per GPU on the busiest (first) pipeline stage.

    single_pass: the step runs one micro-batch, so its gradients appear only while backward frees
    its activations: the two never peak together, and the total holds the larger of them. From
    a second micro-batch on (accumulation, pipelining) the gradients are resident all along.
    """

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    communication: float
    single_pass: bool = False
    ema: float = 0.0

    @property
    def total(self) -> float:
        if self.single_pass:
            live = max(self.gradients, self.activations)
        else:
            live = self.gradients + self.activations
        return self.parameters + self.optimizer + self.ema + self.communication + live


@dataclass(frozen=True)
class LayoutEstimate:
    layout: Layout
    memory: MemoryBreakdown
    compute_s: float
    exposed_comm_s: dict[str, float]  # fsdp, tp, cp, pp: communication not hidden behind compute
    bubble: float  # idle fraction of the step
    step_s: float
    tokens_per_s_per_gpu: float
    mfu: float


@dataclass(frozen=True)
class _Params:
    block: int  # all layers' blocks, both streams
    outside: int  # embedders, timestep embedders, heads


@lru_cache(maxsize=None)
def _params(config: ModelConfig) -> _Params:
    counts = parameter_counts(build_on_meta(config))
    block = counts["video: blocks"] + counts.get("action: blocks", 0)
    return _Params(block=block, outside=counts["total"] - block)


def _stream_layer_bytes(width: int, ffn: int, config: ModelConfig, cross: bool, act: int, checkpointed: bool):
    """(split, gathered): bytes one token of a stream keeps for backward in one layer; `split`
    divides over tp, `gathered` (column-parallel linear inputs) does not."""
    a, heads, f32 = config.attention_width, config.num_heads, 4
    if checkpointed:  # the layer's input only; the rest is recomputed in backward
        return act * width, 0.0
    # Block: fp32 norm inputs and outputs, 1 + scale, the 6-way modulation, gated-residual operands
    # (14 x width); fp32 upcasts of q and k for RoPE; q/k projections and the to_out input; the FFN
    # hidden before and after GELU. Joint attention: q, k, v, output and logsumexp.
    split = f32 * (14 * width + 2 * a) + act * (3 * a + 2 * ffn) + act * 4 * a + f32 * heads
    gathered = act * 2 * width
    if cross:  # norm2 input (fp32), q projection and its norm, output, to_out input, logsumexp
        split += f32 * width + act * 4 * a + f32 * heads
        gathered += act * width
    return split, gathered


def _layer_bytes(config: ModelConfig, workload: Workload, tp: int, cp: int, checkpointed: bool) -> float:
    """Bytes one layer keeps for backward for one micro-batch, per GPU."""
    mix, act = workload.mix, _act_bytes(workload)
    video_path = mix.video_stream_tokens(config)
    split, gathered = _stream_layer_bytes(config.video_width, config.video_ffn_dim, config, True, act, checkpointed)
    total = video_path * (split / tp + gathered)
    if config.dual_stream:
        split, gathered = _stream_layer_bytes(
            config.action_width, config.action_ffn_dim, config, False, act, checkpointed
        )
        total += mix.action_tokens * (split / tp + gathered)
    if checkpointed:
        return total / cp
    if workload.attention == "sdpa":
        # SDPA turns the boolean masks into additive masks of the activation dtype and keeps them.
        total += act * (mix.tokens * mix.tokens + video_path * mix.text_tokens_total)
    text = mix.text_tokens_total * act * 3 * config.attention_width / tp
    return total / cp + text  # every CP rank holds the whole text: its k (projection, norm) and v


def _checkpointed_layers(layers: int, workload: Workload) -> int:
    """How many of the first `layers` depths recompute their forward in backward."""
    mode = workload.activation_checkpointing
    if mode == "none":
        return 0
    return layers if mode == "full" else math.ceil(layers / workload.checkpoint_every)


def _outside_bytes(config: ModelConfig, workload: Workload) -> float:
    """Bytes kept outside the blocks for one sequence: embedders, the per-token timestep embedding
    and its fp32 modulation projection (read by every layer), RoPE tables, heads and losses."""
    mix, act, f32 = workload.mix, _act_bytes(workload), 4
    c = config

    def stream(width: int, io: int, hidden: int) -> float:
        embed = f32 * io + act * 2 * hidden
        timestep = act * c.freq_dim + act * 3 * width + f32 * (width + 6 * width)
        head = f32 * 3 * width + act * (width + 2 * hidden) + io * (act + 4 * f32)
        return embed + timestep + head + f32 * c.head_dim

    video = stream(c.video_width, c.video_token_dim, c.video_width)
    action = stream(c.stream_width, c.action_dim, c.action_io_hidden if c.dual_stream else c.stream_width)
    text = f32 * c.text_dim + act * 3 * c.video_width
    video_path = mix.video_stream_tokens(c)
    masks = mix.tokens * mix.tokens + video_path * mix.text_tokens_total if workload.attention == "sdpa" else 0
    return mix.video_tokens * video + mix.action_tokens * action + mix.text_tokens_total * text + masks


def _act_bytes(workload: Workload) -> int:
    return 2 if workload.precision == "bf16" else 4


def _micro_batches(layout: Layout, workload: Workload) -> int:
    return workload.sequences_per_gpu * layout.pp * layout.cp * layout.tp


def memory_estimate(config: ModelConfig, layout: Layout, workload: Workload) -> MemoryBreakdown:
    """Bytes per GPU of one training step on the first pipeline stage (see the module doc).

    Everything is counted as resident at once, except that with a single micro-batch per step the
    gradients and the activations take turns (MemoryBreakdown.single_pass): counting both
    overstated the measured CPU peak by the gradient size (+13% at 1K tokens, +4% at 8K).
    """
    params = _params(config)
    stage_layers = config.num_layers // layout.pp
    layer_params = params.block / config.num_layers / layout.tp
    stage_params = layer_params * stage_layers + params.outside
    shard = layout.dp_shard * layout.cp
    act = _act_bytes(workload)

    communication = 0.0
    if shard > 1 or workload.precision == "bf16":
        # FSDP2: the gathered bf16 layer, the prefetched next one, the fp32 gradients of the layer
        # being reduce-scattered, and the outside weights, gathered once per step.
        communication += layer_params * (2 * act + 4) + params.outside * act
    tokens = workload.mix.tokens / layout.cp
    if layout.tp > 1:  # all-gather output and reduce-scatter input of one sequence-parallel region
        communication += 2 * tokens * config.video_width * act
    if layout.cp > 1:  # all-to-all send and receive buffers of q, k, v
        communication += 2 * 3 * tokens * config.attention_width / layout.tp * act

    in_flight = min(layout.pp, _micro_batches(layout, workload))
    if layout.virtual_stages > 1:  # interleaving keeps more micro-batches alive on stage 0
        in_flight *= 1 + (layout.pp - 1) / (layout.pp * layout.virtual_stages)
    checkpointed = _checkpointed_layers(stage_layers, workload)
    full_layer = _layer_bytes(config, workload, layout.tp, layout.cp, False)
    boundary = _layer_bytes(config, workload, layout.tp, layout.cp, True)
    kept = (checkpointed * boundary + (stage_layers - checkpointed) * full_layer) * in_flight
    if checkpointed:  # backward recomputes one layer at a time and holds all of it
        kept += full_layer
    outside = _outside_bytes(config, workload) / layout.cp * in_flight
    return MemoryBreakdown(
        parameters=4 * stage_params / shard,
        gradients=4 * stage_params / shard,
        optimizer=8 * stage_params / shard,
        activations=kept + outside,
        communication=communication,
        single_pass=_micro_batches(layout, workload) == 1,
        ema=4 * stage_params / shard if workload.ema else 0.0,
    )


def _bandwidth(cluster: Cluster, inner: int, size: int) -> float:
    """Bytes/s of a group of `size` ranks with stride `inner`: NVLink if it fits in one node."""
    gbps = cluster.intra_node_gbps if inner * size <= cluster.gpus_per_node else cluster.inter_node_gbps
    return gbps * 1e9


def step_estimate(
    config: ModelConfig, cluster: Cluster, layout: Layout, workload: Workload, attended_keys: float | None = None
) -> LayoutEstimate:
    """Predicted time of one step and its throughput for one layout (see the module doc).

    compute = (3 + r) x forward FLOPs per GPU / (peak x efficiency), where r is the fraction of the
    depths that activation checkpointing recomputes (1 for full). Exposed communication, per GPU and
    step with m micro-batches:
      FSDP  per micro-batch: all-gather of the stage's bf16 weights in forward and in backward,
            reduce-scatter of fp32 gradients, ring over dp_shard x cp; HSDP all-reduce over
            dp_replicate once per step. Hidden behind compute except the first gather of each
            pass and whatever exceeds the compute time.
      TP    per layer and micro-batch, each sequence-parallel region (video: self-attention,
            cross-attention, FFN; action: attention, FFN) all-gathers its input and reduce-scatters
            its output in forward and again in backward (and in the recompute); not overlapped.
      CP    Ulysses all-to-all of q, k, v and the output per self-attention, forward and backward.
      PP    send/receive between stages of both streams' hidden states, their fp32 timestep
            embeddings and modulation projections, and the projected text (parallelism/pipeline.py);
            bubble (p-1)/(m+p-1), divided by the virtual stages for interleaved 1F1B;
            step = work / (1 - bubble).
    """
    mix, act = workload.mix, _act_bytes(workload)
    params = _params(config)
    p, cp, tp = layout.pp, layout.cp, layout.tp
    micro = _micro_batches(layout, workload)
    stage_layers = config.num_layers // p
    fwd = forward_flops(config, mix, attended_keys).total
    tokens_per_gpu = workload.sequences_per_gpu * mix.tokens
    model_flops = 3 * fwd * workload.sequences_per_gpu
    recomputed = _checkpointed_layers(config.num_layers, workload) / config.num_layers
    compute_s = (model_flops + recomputed * fwd * workload.sequences_per_gpu) / (
        cluster.gpu.peak_bf16_tflops * 1e12 * workload.efficiency
    )

    exposed: dict[str, float] = {}
    stage_params = params.block / p / tp + params.outside
    shard = layout.dp_shard * cp
    fsdp_s = 0.0
    if shard > 1:
        bw = _bandwidth(cluster, tp, shard)
        ring = (shard - 1) / shard
        fsdp_s += micro * stage_params * (2 * act + 4) * ring / bw
    if layout.dp_replicate > 1:
        r = layout.dp_replicate
        bw = _bandwidth(cluster, layout.dp_shard * cp * tp, r)
        fsdp_s += 2 * 4 * stage_params / shard * (r - 1) / r / bw
    exposed["fsdp"] = max(0.0, fsdp_s - compute_s) + fsdp_s / stage_layers

    passes = 2 + recomputed  # forward, backward and the recomputed forwards
    tokens = mix.tokens / cp
    video_path = mix.video_stream_tokens(config)
    tp_s = 0.0
    if tp > 1:
        bw = _bandwidth(cluster, 1, tp)
        region_bytes = 3 * video_path / cp * config.video_width * act
        if config.dual_stream:
            region_bytes += 2 * mix.action_tokens / cp * config.action_width * act
        tp_s = micro * stage_layers * passes * 2 * region_bytes * (tp - 1) / tp / bw
    exposed["tp"] = tp_s

    cp_s = 0.0
    if cp > 1:
        bw = _bandwidth(cluster, tp, cp)
        per_tensor = tokens * config.attention_width / tp * act
        cp_s = micro * stage_layers * passes * 4 * per_tensor * (cp - 1) / cp / bw
    exposed["cp"] = cp_s

    pp_s, bubble = 0.0, 0.0
    if p > 1:
        bw = _bandwidth(cluster, layout.dp_replicate * layout.dp_shard * cp * tp, p)
        f32 = 4
        hidden = (mix.video_tokens * config.video_width + mix.action_tokens * config.stream_width) / tp * act
        conditioning = 7 * f32 * (mix.video_tokens * config.video_width + mix.action_tokens * config.stream_width)
        boundary = (hidden + conditioning + mix.text_tokens_total * config.video_width * act) / cp
        pp_s = micro * layout.virtual_stages * 2 * boundary / bw
        bubble = (p - 1) / (micro + p - 1) / layout.virtual_stages
    exposed["pp"] = pp_s

    step_s = (compute_s + sum(exposed.values())) / (1 - bubble)
    return LayoutEstimate(
        layout=layout,
        memory=memory_estimate(config, layout, workload),
        compute_s=compute_s,
        exposed_comm_s=exposed,
        bubble=bubble,
        step_s=step_s,
        tokens_per_s_per_gpu=tokens_per_gpu / step_s,
        mfu=model_flops / step_s / (cluster.gpu.peak_bf16_tflops * 1e12),
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _allowed(layout: Layout, config: ModelConfig, world: int, mix: SequenceMix) -> bool:
    """The mesh's own validation (parallelism/mesh.py), so the plan offers only runnable layouts."""
    parallel = ParallelConfig(
        pp=layout.pp, pp_virtual_stages=layout.virtual_stages, dp_replicate=layout.dp_replicate,
        dp_shard=layout.dp_shard, cp=layout.cp, tp=layout.tp,
    )
    try:
        ParallelDims.resolve(
            parallel, world, model=config, token_budget=mix.token_budget, pad_multiple=mix.pad_multiple
        )
    except UserError:
        return False
    return True


def candidate_layouts(config: ModelConfig, cluster: Cluster, workload: Workload) -> list[Layout]:
    """Every layout with tp inside a node that the mesh accepts (heads divisible by tp x cp, layers
    by the pipeline stages x virtual stages, the token budget by cp, the pad multiple by tp x cp);
    pipelines are tried with 1 and 2 virtual stages."""
    world = cluster.world_size
    layouts = []
    for tp in _divisors(cluster.gpus_per_node):
        for cp in _divisors(world // tp):
            for pp in _divisors(world // (tp * cp)):
                dp = world // (tp * cp * pp)
                for dp_replicate in _divisors(dp):
                    for v in (1, 2) if pp > 1 else (1,):
                        layout = Layout(pp, dp_replicate, dp // dp_replicate, cp, tp, v)
                        if _allowed(layout, config, world, workload.mix):
                            layouts.append(layout)
    return layouts


def all_estimates(config: ModelConfig, cluster: Cluster, workload: Workload) -> list[LayoutEstimate]:
    keys = mean_attended_keys(workload.mix)
    layouts = candidate_layouts(config, cluster, workload)
    return [step_estimate(config, cluster, layout, workload, keys) for layout in layouts]


def _fits(estimate: LayoutEstimate, cluster: Cluster) -> bool:
    return estimate.memory.total <= cluster.gpu.memory_gib * GiB * (1 - MEMORY_HEADROOM)


def plan(model_config: ModelConfig, cluster: Cluster, workload: Workload) -> list[LayoutEstimate]:
    """The layouts that fit in GPU memory (less MEMORY_HEADROOM), fastest first."""
    fitting = [e for e in all_estimates(model_config, cluster, workload) if _fits(e, cluster)]
    return sorted(fitting, key=lambda e: (-e.tokens_per_s_per_gpu, e.memory.total))

"""`lbva plan`: the command line over plan.py's estimates.

`lbva plan --preset NAME` ranks the layouts that fit a cluster; `lbva plan --config RECIPE` prints
one training config's own layout: its memory per GPU, its step time and the run it makes in
GPU-hours. The launcher registers the command (`register`) and reads the recipe's TOML, since
parallelism does not import the training config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lbva.errors import UserError
from lbva.models.config import PRESETS, ModelConfig, get_preset

from .flops import SequenceMix, mean_attended_keys
from .mesh import ParallelConfig, validate_layout
from .plan import (
    GPU_TYPES, MEMORY_HEADROOM, Cluster, GiB, GPUType, Layout, LayoutEstimate, MemoryBreakdown, Workload,
    all_estimates, plan, step_estimate,
)


@dataclass(frozen=True)
class Recipe:
    """What `lbva plan --config` plans from a training config: its model, its layout and its
    sequences. The launcher reads the TOML (parallelism does not import the training config) and
    hands this over through `register(..., load_recipe=)`."""

    name: str
    preset: str
    parallel: ParallelConfig
    mix: SequenceMix  # video_tokens_per_frame / actions_per_frame come from the flags
    steps: int
    attention: Literal["flex", "sdpa"] = "flex"
    ema: bool = False  # the recipe keeps an EMA of the weights (optim.ema_decay > 0)
    model: ModelConfig | None = None  # the preset with the recipe's model.width/heads/layers; None: the preset


# Flags that describe the workload: with --config the recipe fixes them (as KEY=VALUE overrides).
_WORKLOAD_FLAGS = ("token_budget", "sequences_per_gpu", "activation_checkpointing", "checkpoint_every", "ema")


def register(subparsers, load_recipe: Callable[[Path, list[str]], Recipe] | None = None) -> None:
    """Add `lbva plan` to the `lbva` command's subparsers. `load_recipe(path, overrides) -> Recipe`
    enables `--config RECIPE [KEY=VALUE ...]`."""
    sub = subparsers.add_parser("plan", help="memory per GPU and predicted throughput of parallel layouts")
    source = sub.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help=f"model preset: {', '.join(PRESETS)}; ranks candidate layouts")
    if load_recipe is not None:
        source.add_argument("--config", type=Path, help="training config: plans its preset, layout and sequences")
        sub.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for `lbva train`")
    sub.add_argument("--gpu", default="H100", help=f"GPU type, any case: {', '.join(GPU_TYPES)}")
    sub.add_argument("--gpus-per-node", type=int, default=8)
    sub.add_argument("--nodes", type=int, default=None,
                     help="default 1; with --config: the layout's world size / --gpus-per-node")
    sub.add_argument("--token-budget", type=int, default=None,
                     help=f"tokens per packed sequence (default {SequenceMix.token_budget})")
    sub.add_argument("--sequences-per-gpu", type=int, default=None, help="packed sequences per GPU per step (default 1)")
    sub.add_argument("--video-tokens-per-frame", type=int, default=SequenceMix.video_tokens_per_frame)
    sub.add_argument("--actions-per-frame", type=int, default=SequenceMix.actions_per_frame)
    sub.add_argument("--activation-checkpointing", choices=["full", "selective", "none"], default=None,
                     help="default full; selective: every --checkpoint-every-th depth")
    sub.add_argument("--checkpoint-every", type=int, default=None, help=f"default {Workload.checkpoint_every}")
    sub.add_argument("--intra-node-gbps", type=float, default=None, help="NVLink GB/s per GPU (default: by GPU type)")
    sub.add_argument("--inter-node-gbps", type=float, default=None, help="network GB/s per GPU (default: by GPU type)")
    sub.add_argument("--efficiency", type=float, default=Workload.efficiency, help="achievable fraction of peak")
    sub.add_argument("--ema", action="store_const", const=True, default=None,
                     help="count an fp32 EMA of the weights (optim.ema_decay > 0)")
    sub.add_argument("--top", type=int, default=5, help="layouts to print")
    sub.set_defaults(func=_cmd_plan, load_recipe=load_recipe, config=None, overrides=[])


def _positive(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name.replace("-", "_"))
        if value is not None and value <= 0:
            raise UserError(f"--{name} must be > 0, got {value}")


def _gpu_type(name: str) -> GPUType:
    for key, gpu in GPU_TYPES.items():
        if key.lower() == name.lower():
            return gpu
    raise UserError(f"--gpu: unknown GPU type '{name}'; known types: {', '.join(GPU_TYPES)}")


def _check_args(args) -> GPUType:
    gpu = _gpu_type(args.gpu)
    _positive(args, "gpus-per-node", "nodes", "token-budget", "sequences-per-gpu", "video-tokens-per-frame",
              "checkpoint-every", "intra-node-gbps", "inter-node-gbps", "efficiency", "top")
    if args.actions_per_frame < 0:
        raise UserError(f"--actions-per-frame must be >= 0, got {args.actions_per_frame}")
    if args.efficiency > 1:
        raise UserError(f"--efficiency is a fraction of peak in (0, 1], got {args.efficiency}")
    return gpu


def _cluster(args, gpu: GPUType, nodes: int) -> Cluster:
    return Cluster(gpu, args.gpus_per_node, nodes,
                   args.intra_node_gbps or gpu.intra_node_gbps, args.inter_node_gbps or gpu.inter_node_gbps)


def _check_mix(mix: SequenceMix, option: str) -> None:
    if mix.token_budget < mix.tokens_per_frame:
        raise UserError(
            f"{option} {mix.token_budget} holds no latent frame: one frame costs {mix.tokens_per_frame} "
            f"tokens ({mix.video_copies} x --video-tokens-per-frame + 2 x --actions-per-frame)"
        )


def _inputs_from_args(args) -> tuple[ModelConfig, Cluster, Workload]:
    if args.preset not in PRESETS:
        raise UserError(f"--preset: unknown preset '{args.preset}'; known presets: {', '.join(PRESETS)}")
    gpu = _check_args(args)
    mix = SequenceMix(
        token_budget=args.token_budget or SequenceMix.token_budget,
        video_tokens_per_frame=args.video_tokens_per_frame, actions_per_frame=args.actions_per_frame,
    )
    _check_mix(mix, "--token-budget")
    workload = Workload(
        mix, args.sequences_per_gpu or 1, args.activation_checkpointing or "full",
        args.checkpoint_every or Workload.checkpoint_every, efficiency=args.efficiency, ema=bool(args.ema),
    )
    return get_preset(args.preset), _cluster(args, gpu, args.nodes or 1), workload


def _gib(n: float) -> str:
    return f"{n / GiB:.1f}"


def _header(config_name: str, cluster: Cluster, workload: Workload) -> list[str]:
    mix = workload.mix
    checkpointing = workload.activation_checkpointing
    if checkpointing == "selective":
        k = workload.checkpoint_every
        checkpointing += f" (depths 0, {k}, {2 * k}, ...)"
    return [
        f"{config_name} on {cluster.nodes} x {cluster.gpus_per_node} {cluster.gpu.name} "
        f"({cluster.gpu.peak_bf16_tflops:.0f} TFLOP/s bf16, {cluster.gpu.memory_gib:.0f} GiB; "
        f"NVLink {cluster.intra_node_gbps:.0f} GB/s, network {cluster.inter_node_gbps:.0f} GB/s per GPU)",
        f"sequence: {mix.tokens} tokens ({mix.windows} x {mix.frames_per_window}-frame windows, "
        f"{mix.video_tokens} video + {mix.action_tokens} action), {workload.sequences_per_gpu:g} per GPU per step; "
        f"activation checkpointing {checkpointing}; efficiency {workload.efficiency:.2f}",
        "",
        f"{'pp':>3} {'dp_rep':>6} {'dp_shard':>8} {'cp':>3} {'tp':>3} {'schedule':>15} {'mem GiB':>8} "
        f"{'step s':>7} {'tok/s/GPU':>10} {'MFU':>6}  exposed comm ms (fsdp/tp/cp/pp), bubble",
    ]


def _row(e: LayoutEstimate) -> str:
    lo, comm = e.layout, e.exposed_comm_s
    return (
        f"{lo.pp:>3} {lo.dp_replicate:>6} {lo.dp_shard:>8} {lo.cp:>3} {lo.tp:>3} {lo.schedule:>15} "
        f"{_gib(e.memory.total):>8} {e.step_s:>7.2f} {e.tokens_per_s_per_gpu:>10,.0f} {e.mfu:>6.1%}  "
        + "/".join(f"{1e3 * comm[k]:.0f}" for k in ("fsdp", "tp", "cp", "pp")) + f", {e.bubble:.0%}"
    )


def _memory_lines(title: str, memory: MemoryBreakdown, verdict: str = "") -> list[str]:
    lines = ["", f"memory per GPU of {title} (GiB){verdict}:"]
    names = ("parameters", "gradients", "optimizer", "ema", "activations", "communication", "total")
    for name in (n for n in names if n != "ema" or memory.ema):
        lines.append(f"  {name:<14} {_gib(getattr(memory, name)):>7}")
    if memory.single_pass:
        lines.append("  (one micro-batch per step: gradients and activations do not peak together; "
                     "the total holds the larger)")
    return lines


def format_plan(
    config_name: str, cluster: Cluster, workload: Workload, estimates: list[LayoutEstimate], top: int
) -> str:
    """The table `lbva plan --preset` prints: the best `top` layouts and the memory breakdown of the best."""
    lines = _header(config_name, cluster, workload) + [_row(e) for e in estimates[:top]]
    return "\n".join(lines + _memory_lines("the best layout", estimates[0].memory))


def format_recipe_plan(recipe: Recipe, cluster: Cluster, workload: Workload, estimate: LayoutEstimate,
                       best: LayoutEstimate | None) -> str:
    """What `lbva plan --config` prints: the recipe's own layout, its memory per GPU, its step time,
    and the run it makes: tokens per step, steps, wall-clock and GPU-hours at the predicted MFU."""
    lo = estimate.layout
    sequences = lo.dp_replicate * lo.dp_shard * workload.sequences_per_gpu * lo.pp * lo.cp * lo.tp
    tokens = sequences * workload.mix.tokens
    hours = recipe.steps * estimate.step_s / 3600
    limit = cluster.gpu.memory_gib * GiB * (1 - MEMORY_HEADROOM)
    fits = "fits" if estimate.memory.total <= limit else "DOES NOT FIT"
    verdict = f", {fits} in {_gib(limit)} GiB ({MEMORY_HEADROOM:.0%} of {_gib(cluster.gpu.memory_gib * GiB)} kept free)"
    lines = _header(f"{recipe.name} ({recipe.preset})", cluster, workload) + [_row(estimate)]
    lines += _memory_lines("this layout", estimate.memory, verdict)
    lines += [
        "",
        f"step: {sequences:g} sequences = {tokens:,.0f} tokens, predicted {estimate.step_s:.2f} s "
        f"({estimate.mfu:.1%} MFU)",
        f"run: {recipe.steps:,} steps = {recipe.steps * tokens / 1e9:,.1f}B tokens, {hours:,.1f} h on "
        f"{cluster.world_size} GPUs = {hours * cluster.world_size:,.0f} GPU-hours",
    ]
    if best is not None and best.layout != lo:
        lines += ["", "the fastest fitting layout on this cluster instead:", _row(best)]
    return "\n".join(lines)


def _recipe_inputs(args) -> tuple[Recipe, ModelConfig, Cluster, Layout, Workload]:
    given = [f"--{name.replace('_', '-')}" for name in _WORKLOAD_FLAGS if getattr(args, name) is not None]
    if given:
        raise UserError(f"{', '.join(given)}: with --config the recipe sets this; override it as KEY=VALUE instead")
    gpu = _check_args(args)
    recipe = args.load_recipe(args.config, args.overrides)
    parallel = recipe.parallel
    if args.nodes is not None:
        world = args.nodes * args.gpus_per_node
    elif parallel.dp_shard == -1:
        raise UserError(f"--config {args.config}: parallel.dp_shard is -1 (whatever the allocation leaves): "
                        "give --nodes (and --gpus-per-node) to plan it")
    else:
        world = parallel.pp * parallel.dp_replicate * parallel.dp_shard * parallel.cp * parallel.tp
    if world % args.gpus_per_node:
        raise UserError(f"--config {args.config}: its layout has {world} ranks, not a multiple of "
                        f"--gpus-per-node {args.gpus_per_node}")
    mix = dataclasses.replace(recipe.mix, video_tokens_per_frame=args.video_tokens_per_frame,
                              actions_per_frame=args.actions_per_frame)
    _check_mix(mix, "data.token_budget")
    model = recipe.model or get_preset(recipe.preset)
    try:
        dims = validate_layout(parallel, world, model=model, token_budget=mix.token_budget,
                               pad_multiple=mix.pad_multiple)
    except UserError as error:
        raise UserError(f"--config {args.config} on {world} GPUs: {error}") from error
    layout = Layout(dims.pp, dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp, parallel.pp_virtual_stages)
    workload = Workload(
        mix, parallel.microbatches / (dims.pp * dims.cp * dims.tp), parallel.activation_checkpoint,
        parallel.checkpoint_every, attention=recipe.attention, efficiency=args.efficiency, ema=recipe.ema,
    )
    return recipe, model, _cluster(args, gpu, world // args.gpus_per_node), layout, workload


def _cmd_plan(args) -> None:
    if args.config is not None:
        recipe, config, cluster, layout, workload = _recipe_inputs(args)
        estimate = step_estimate(config, cluster, layout, workload, mean_attended_keys(workload.mix))
        fitting = plan(config, cluster, workload)
        print(format_recipe_plan(recipe, cluster, workload, estimate, fitting[0] if fitting else None))
        return
    if args.overrides:
        raise UserError(f"{args.overrides[0]}: KEY=VALUE overrides apply to a --config, not to --preset")
    config, cluster, workload = _inputs_from_args(args)
    fitting = plan(config, cluster, workload)
    if not fitting:
        # Plain data parallelism always passes the mesh rules, so there is a smallest layout.
        smallest = min(all_estimates(config, cluster, workload), key=lambda e: e.memory.total)
        remedies = ["a smaller --token-budget", "more --nodes"]
        if workload.activation_checkpointing != "full":
            remedies.insert(0, "--activation-checkpointing full")
        raise UserError(
            f"no layout fits in {cluster.gpu.memory_gib:.0f} GiB per {cluster.gpu.name} (keeping "
            f"{MEMORY_HEADROOM:.0%} free); the smallest needs {_gib(smallest.memory.total)} GiB; try "
            + " or ".join(remedies)
        )
    print(format_plan(args.preset, cluster, workload, fitting, args.top))

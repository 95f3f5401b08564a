"""Tokens/s and MFU of one training step (forward + backward + AdamW) of a model preset.

    python bench/step_throughput.py                      # CUDA: lingbot-va-5b-mot; CPU: demo-mot
    python bench/step_throughput.py --layers 8 --precision fp8 --compile --json out.json

The step is the trainer's own (training/trainer.py: train_step) on synthetic packed sequences of
the shape given by the options: on CUDA with bf16 autocast and compiled FlexAttention over the
packed spec 2.3 mask, on the CPU in float32 with SDPA and the dense mask. MFU divides the model
FLOPs of parallelism/flops.py (the formula `lbva plan` uses) by the bf16 dense peak, also for fp8.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from lbva.errors import UserError
from lbva.models.action_space import ACTION_DIM
from lbva.models.config import PRESETS, get_preset
from lbva.models.mot import LingBotVA
from lbva.parallelism.activation_checkpoint import apply_activation_checkpointing
from lbva.parallelism.flops import SequenceMix, training_flops_per_token
from lbva.parallelism.fp8 import apply_fp8
from lbva.parallelism.parallelize import apply_compile
from lbva.parallelism.plan import GPU_TYPES
from lbva.parallelism.step_layout import plain_layout
from lbva.training.config import TrainConfig
from lbva.training.data.packing import PackedSequence, build_packed_sequence, cut_windows
from lbva.training.data.samples import EpisodeSample
from lbva.training.optim import build_optimizer
from lbva.training.step import FlowMatchingObjective
from lbva.training.trainer import draw_sequences, train_step

# Per device: what runs by default. The CPU defaults keep a step around a second on 2 cores.
DEFAULTS = {
    "cuda": dict(preset="lingbot-va-5b-mot", token_budget=10240, video_tokens_per_frame=192, actions_per_frame=16,
                 text_tokens=512),
    "cpu": dict(preset="demo-mot", token_budget=2048, video_tokens_per_frame=64, actions_per_frame=8, text_tokens=16),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--preset", choices=list(PRESETS), default=None, help="default: by device")
    parser.add_argument("--layers", type=int, default=None, help="cut the model to this many layers")
    parser.add_argument("--precision", choices=["bf16", "fp8"], default="bf16",
                        help="fp8: torchao float8 for the video block linears (CUDA only)")
    parser.add_argument("--compile", action="store_true", help="compile each depth as training does (parallelize.py)")
    parser.add_argument("--checkpointing", choices=["none", "full"], default="none",
                        help="full: recompute every depth in backward (activation_checkpoint.py)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--token-budget", type=int, default=None)
    parser.add_argument("--video-tokens-per-frame", type=int, default=None)
    parser.add_argument("--actions-per-frame", type=int, default=None)
    parser.add_argument("--text-tokens", type=int, default=None)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak; default: by GPU name")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    for name, value in DEFAULTS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("steps", "layers", "token_budget", "video_tokens_per_frame", "text_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.precision == "fp8" and args.device != "cuda":
        raise UserError("--precision fp8 needs a CUDA GPU (torchao float8 GEMMs); this run is on the CPU")
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    return args


def _latent_grid(tokens_per_frame: int) -> tuple[int, int]:
    """Latent height and width (patch 2 x 2) whose grid has exactly tokens_per_frame tokens."""
    rows = max(d for d in range(1, math.isqrt(tokens_per_frame) + 1) if tokens_per_frame % d == 0)
    return 2 * rows, 2 * (tokens_per_frame // rows)


def synthetic_sequence(mix: SequenceMix, in_channels: int, text_dim: int, seed: int = 0) -> PackedSequence:
    """One packed sequence of random windows with exactly the token counts of `mix`."""
    generator = torch.Generator().manual_seed(seed)
    height, width = _latent_grid(mix.video_tokens_per_frame)
    frames, n = mix.frames_per_window, mix.actions_per_frame
    samples = [
        EpisodeSample(
            key=f"bench/{i}", source="bench",
            latents=torch.randn(in_channels, frames, height, width, generator=generator),
            actions=torch.randn(ACTION_DIM, frames, n, generator=generator),
            action_mask=torch.ones(ACTION_DIM, dtype=torch.bool),
            text_emb=torch.randn(mix.text_tokens, text_dim, generator=generator),
        )
        for i in range(mix.windows)
    ]
    windows = [w for s in samples for w in cut_windows(s, frames, frames)]
    return build_packed_sequence(windows, (1, 2, 2), pad_multiple=128, forward_dynamics=False)


def _peak_tflops(args, device: torch.device) -> float | None:
    if args.peak_tflops is not None:
        return args.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((gpu.peak_bf16_tflops for key, gpu in GPU_TYPES.items() if key in name), None)
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> dict:
    """Time the steps and return the summary (also printed as a table)."""
    device = torch.device(args.device)
    full = get_preset(args.preset)
    config = get_preset(args.preset, num_layers=args.layers) if args.layers else full
    mix = SequenceMix(
        token_budget=args.token_budget, video_tokens_per_frame=args.video_tokens_per_frame,
        actions_per_frame=args.actions_per_frame, text_tokens=args.text_tokens,
    )
    try:
        mix.validate()
    except ValueError as error:
        raise UserError(f"sequence options: {error}") from error

    torch.manual_seed(0)
    model = LingBotVA(config).to(device)
    fp8 = apply_fp8(model, "torchao") if args.precision == "fp8" else None
    if args.compile:
        apply_compile(model.depths())
    if args.checkpointing == "full":
        apply_activation_checkpointing(model.depths(), "full", 1)
    train_config = TrainConfig()
    train_config.model.attention = "auto"  # compiled flex on CUDA, SDPA with the dense mask on CPU
    seq = synthetic_sequence(mix, config.in_channels, config.text_dim)
    objective = FlowMatchingObjective(train_config.objective, empty_text=torch.zeros(mix.text_tokens, config.text_dim))
    optimizer = build_optimizer(model, train_config.optim)
    layout = plain_layout(train_config.model.attention)

    seconds: list[float] = []
    losses: list[float] = []
    for step in range(1, args.warmup + args.steps + 1):
        if step == args.warmup + 1 and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        started = time.perf_counter()
        sequences = draw_sequences(objective, [seq], train_config.run.seed, step, dp_rank=0, dp_size=1)
        terms, _ = train_step(model, objective, layout, sequences, [1.0], train_config, device)
        losses.append(float(terms.total))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if fp8 is not None:
            fp8.after_optimizer_step()
        _sync(device)
        if step > args.warmup:
            seconds.append(time.perf_counter() - started)

    median = statistics.median(seconds)
    flops_per_token = training_flops_per_token(config, mix)
    tokens_per_s = seq.real_tokens / median
    peak = _peak_tflops(args, device)
    achieved = flops_per_token * tokens_per_s / 1e12
    return {
        "preset": args.preset,
        "layers": config.num_layers,
        "full_layers": full.num_layers,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": args.precision if device.type == "cuda" else "fp32",
        "compile": args.compile,
        "checkpointing": args.checkpointing,
        "attention": "flex" if device.type == "cuda" else "sdpa",
        "tokens_per_step": seq.real_tokens,
        "sequence_length": int(seq.video_x0.shape[0] + seq.action_x0.shape[0]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "warmup_steps": args.warmup,
        "step_seconds": seconds,
        "losses": losses,
        "median_step_s": median,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_per_token,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "mfu": achieved / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "torch": torch.__version__,
    }


def format_summary(summary: dict) -> str:
    depth = f"{summary['layers']} layers"
    if summary["layers"] != summary["full_layers"]:
        depth = f"depth cut to {summary['layers']} of {summary['full_layers']} layers"
    mfu = f"{summary['mfu']:.1%}" if summary["mfu"] is not None else "n/a (no peak known: give --peak-tflops)"
    memory = f"{summary['peak_memory_gib']:.1f} GiB" if summary["peak_memory_gib"] is not None else "n/a"
    lines = [
        f"step throughput: {summary['preset']} ({depth}, {summary['parameters']:,} parameters) on {summary['device']}",
        f"  {summary['precision']}, {'compiled' if summary['compile'] else 'eager'}, {summary['attention']} attention, "
        f"{summary['tokens_per_step']} tokens per step (sequence of {summary['sequence_length']} with padding), "
        f"{summary['warmup_steps']} warm-up steps",
        "",
        f"{'step':>5} {'seconds':>9} {'tokens/s':>12}",
    ]
    for i, s in enumerate(summary["step_seconds"], 1):
        lines.append(f"{i:>5} {s:>9.3f} {summary['tokens_per_step'] / s:>12,.0f}")
    lines += [
        "",
        f"median step {summary['median_step_s']:.3f} s: {summary['tokens_per_s']:,.0f} tokens/s, "
        f"{summary['flops_per_token'] / 1e9:.3g} GFLOP/token, {summary['achieved_tflops']:.3g} TFLOP/s, MFU {mfu}, "
        f"peak memory {memory}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        summary = run(args)
    except UserError as error:
        print(f"step_throughput: error: {error}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

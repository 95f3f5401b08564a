"""The whole GPU check of issue #13 in one command: one JSON, one markdown table, both printed.

    python bench/gpu_check.py --json $OUT/gpu.json              # one H100/H200, under 8 minutes
    python bench/gpu_check.py --device cpu --tiny --json x.json  # the same code paths at toy size

Parts, in this order, each guarded (a part that fails records its error and the others still run)
and each saved to the JSON as it finishes (a run killed at its time limit keeps what finished):

    attention   compiled FlexAttention vs SDPA with the dense spec 2.3 mask, forward and backward:
                max error, and both timed against SDPA with a plain causal mask (FlashAttention)
    step        the trainer's step (bench/step_throughput.py) of lingbot-va-5b-mot at the recipe's
                token budget, compiled: tokens/s, MFU (parallelism/flops.py), peak memory beside
                `lbva plan`'s memory_estimate for the same layout; the depth is the most layers the
                planner says fit the GPU without activation checkpointing (step_throughput has none)
    fp8         the same step with torchao float8 (parallelism/fp8.py): speedup over bf16
    inference   the shared layout at RoboTwin settings (bench/inference_latency.py's episodes,
                on the runtime without a server): per-chunk latency sync and async, KV-cache memory
    tests       the gpu-marked tests (pytest -m gpu) on this machine

Only torch, numpy, safetensors and lbva are imported at module level; each part imports what else
it needs, so the GPU image (no torchao, diffusers, webdataset, ...) can run every other part.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from lbva.models.config import get_preset
from lbva.parallelism.flops import SequenceMix
from lbva.parallelism.plan import Layout, Workload, memory_estimate

ROOT = Path(__file__).resolve().parents[1]
PART_NAMES = ("attention", "step", "fp8", "inference", "tests")  # the order they run in

# Per size: the figures each part runs at. "full" is the issue's; "tiny" keeps the CPU dry run short.
SIZES = {
    "full": dict(
        test_paths=["tests"], test_timeout_s=120,
        attention_tokens=10240, heads=24, head_dim=128, attention_repeats=10,
        step_preset="lingbot-va-5b-mot", mix=dict(token_budget=10240, video_tokens_per_frame=192,
                                                  actions_per_frame=16, text_tokens=512),
        step_steps=3, step_warmup=2,
        inference_preset="lingbot-va-shared", image_size=256, chunk_size=4, actions_per_frame=16,
        video_steps=25, action_steps=50, text_tokens=512, chunks=6,
    ),
    "tiny": dict(
        test_paths=["tests/gpu"], test_timeout_s=120,
        attention_tokens=512, heads=2, head_dim=16, attention_repeats=1,
        step_preset="tiny-mot", mix=dict(token_budget=512, video_tokens_per_frame=16,
                                         actions_per_frame=4, text_tokens=8),
        step_steps=1, step_warmup=1,
        inference_preset="tiny-shared", image_size=32, chunk_size=2, actions_per_frame=4,
        video_steps=1, action_steps=1, text_tokens=8, chunks=3,
    ),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_ms(fn, device: torch.device, repeats: int) -> float:
    """Mean milliseconds of fn() after one untimed call (compilation, allocator)."""
    fn()
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - started) / repeats * 1e3


def part_tests(device: torch.device, size: dict) -> dict:
    """pytest -m gpu in a child process; its summary line and exit status (0 = all passed/skipped)."""
    # The GPU image lacks some test dependencies: a module that fails to collect must not stop the rest.
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "--continue-on-collection-errors",
               *size["test_paths"]]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=size["test_timeout_s"])
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {"command": " ".join(command[1:]), "returncode": done.returncode, "summary": lines[-1] if lines else "",
            "cuda": torch.cuda.is_available()}


def _spec_layout(size: dict, device: torch.device):
    """The self-attention TokenLayout of one packed step at the attention part's token count, built
    by the objective itself (training/step.py prepare), so the mask is the one training uses."""
    from step_throughput import synthetic_sequence

    from lbva.training.config import TrainConfig
    from lbva.training.step import FlowMatchingObjective

    config = get_preset("tiny-mot")
    mix = SequenceMix(token_budget=size["attention_tokens"], **{k: v for k, v in size["mix"].items()
                                                                if k != "token_budget"})
    seq = synthetic_sequence(mix, config.in_channels, config.text_dim)
    objective = FlowMatchingObjective(TrainConfig().objective, empty_text=torch.zeros(mix.text_tokens, config.text_dim))
    draws = objective.draw(seq, torch.Generator().manual_seed(0))
    return objective.prepare(seq, draws, (1, 2, 2), device).layout


def part_attention(device: torch.device, size: dict) -> dict:
    """Flex (compiled on CUDA) against the dense-mask SDPA reference on the spec mask."""
    from torch.nn import functional as F

    from lbva.models.attention import flex_kernel, sdpa_kernel
    from lbva.models.masks import dense_self_attention_mask, flex_self_attention_mask

    on_cuda = device.type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    layout = _spec_layout(size, device)
    started = time.perf_counter()
    block_mask = flex_self_attention_mask(layout, compile_mask=on_cuda)
    _sync(device)
    block_mask_ms = (time.perf_counter() - started) * 1e3
    flex = flex_kernel(block_mask, compiled=on_cuda)
    dense = sdpa_kernel(dense_self_attention_mask(layout))

    def causal(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True).transpose(1, 2)

    # FlexAttention has no backward on the CPU (torch 2.13): the dry run checks the forward only.
    backward = on_cuda
    shape = (1, layout.length, size["heads"], size["head_dim"])
    generator = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=generator).requires_grad_(backward)
               for _ in range(3))

    def run(kernel):
        """The output and, with backward, the gradients of q, k, v."""
        for tensor in (q, k, v):
            tensor.grad = None
        out = kernel(q, k, v)
        if backward:
            out.float().square().mean().backward()
        return [out.detach()] + ([t.grad for t in (q, k, v)] if backward else [])

    errors = [float((a.float() - b.float()).abs().max()) for a, b in zip(run(flex), run(dense), strict=True)]
    repeats = size["attention_repeats"]
    times = {name: _timed_ms(lambda kernel=kernel: run(kernel), device, repeats)
             for name, kernel in (("flex", flex), ("dense_sdpa", dense), ("causal_sdpa", causal))}
    return {
        "tokens": layout.length, "dtype": str(dtype), "backward": backward, "block_mask_build_ms": block_mask_ms,
        "max_abs_error": errors[0], "max_abs_grad_error": max(errors[1:], default=None),
        "ms": times,
        "flex_over_causal": times["flex"] / times["causal_sdpa"],
        "dense_over_causal": times["dense_sdpa"] / times["causal_sdpa"],
    }


def _deepest_fitting(preset: str, mix: SequenceMix, device: torch.device) -> tuple[int, float]:
    """Most layers whose planner estimate (full activation checkpointing, as the step runs) fits
    90% of the GPU's memory, and that estimate in GiB; all layers on the CPU."""
    full = get_preset(preset)
    workload = Workload(mix=mix, activation_checkpointing="full",
                        **({} if device.type == "cuda" else dict(precision="fp32", attention="sdpa")))
    budget = torch.cuda.get_device_properties(device).total_memory * 0.9 if device.type == "cuda" else math.inf
    layers = full.num_layers
    while layers > 1 and memory_estimate(get_preset(preset, num_layers=layers), Layout(), workload).total > budget:
        layers -= 1
    return layers, memory_estimate(get_preset(preset, num_layers=layers), Layout(), workload).total / 2**30


def _step_summary(device: torch.device, size: dict, layers: int, precision: str) -> dict:
    """bench/step_throughput.py's run at this check's size."""
    import step_throughput

    mix = size["mix"]
    argv = ["--device", device.type, "--preset", size["step_preset"], "--layers", str(layers),
            "--precision", precision, "--checkpointing", "full", "--steps", str(size["step_steps"]), "--warmup", str(size["step_warmup"]),
            "--token-budget", str(mix["token_budget"]), "--video-tokens-per-frame", str(mix["video_tokens_per_frame"]),
            "--actions-per-frame", str(mix["actions_per_frame"]), "--text-tokens", str(mix["text_tokens"])]
    if device.type == "cuda":
        argv.append("--compile")
    return step_throughput.run(step_throughput.parse_args(argv))


def part_step(device: torch.device, size: dict, shared: dict) -> dict:
    layers, predicted_gib = _deepest_fitting(size["step_preset"], SequenceMix(**size["mix"]), device)
    summary = _step_summary(device, size, layers, "bf16")
    shared["bf16"] = summary
    keep = ("preset", "layers", "full_layers", "precision", "compile", "checkpointing", "tokens_per_step", "median_step_s",
            "tokens_per_s", "flops_per_token", "achieved_tflops", "mfu", "peak_memory_gib")
    return {**{key: summary[key] for key in keep}, "predicted_peak_gib": predicted_gib}


def part_fp8(device: torch.device, size: dict, shared: dict) -> dict:
    """The step with torchao float8; needs CUDA (and torchao, which parallelism/fp8.py imports)."""
    if device.type != "cuda":
        return {"skipped": "float8 GEMMs need a CUDA GPU"}
    if "bf16" not in shared:
        return {"skipped": "the bf16 step failed, nothing to compare against"}
    bf16 = shared["bf16"]
    summary = _step_summary(device, size, bf16["layers"], "fp8")
    return {"layers": summary["layers"], "tokens_per_s": summary["tokens_per_s"],
            "speedup": summary["tokens_per_s"] / bf16["tokens_per_s"], "peak_memory_gib": summary["peak_memory_gib"],
            # Same seed, same draws per step: the runs differ only in the video block GEMMs.
            "max_loss_difference": max(abs(a - b) for a, b in zip(summary["losses"], bf16["losses"], strict=True))}


class _LocalClient:
    """The runtime behind the client interface bench/inference_latency.py's episodes drive, so the
    latency is the runtime's own (no websocket server, whose packages the GPU image may lack)."""

    def __init__(self, runtime) -> None:
        self.runtime = runtime

    def reset(self, prompt: str) -> None:
        self.runtime.reset(prompt)

    def infer(self, observation, prompt: str):
        return self.runtime.infer(observation)

    def feedback(self, keyframes, executed) -> None:
        self.runtime.feedback(keyframes, executed)


def part_inference(device: torch.device, size: dict) -> dict:
    from inference_latency import Robot, make_bundle, run_async, run_sync

    from lbva.inference.bundle import load_bundle
    from lbva.inference.settings import InferenceSettings

    settings = InferenceSettings(chunk_size=size["chunk_size"], video_steps=size["video_steps"],
                                 action_steps=size["action_steps"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        bundle = make_bundle(Path(tmp), size["inference_preset"], size["image_size"], settings,
                             size["actions_per_frame"], size["text_tokens"])
        runtime = load_bundle(bundle).runtime(device=device.type, dtype=dtype)
    client = _LocalClient(runtime)
    robot = Robot(size["image_size"], 0.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync = run_sync(client, robot, size["chunks"], size["chunk_size"])
    cache = runtime.cache
    kv_cache_gib = sum(t.nbytes for t in cache.keys + cache.values) / 2**30
    asyn = run_async(client, robot, size["chunks"], size["chunk_size"])
    return {"preset": size["inference_preset"], "dtype": str(dtype), "video_steps": size["video_steps"],
            "action_steps": size["action_steps"], "chunks": size["chunks"],
            "sync_chunk_ms": sync.steady_latency() * 1e3, "async_chunk_ms": asyn.steady_latency() * 1e3,
            "kv_cache_gib": kv_cache_gib,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def guarded(name: str, part, *args) -> dict:
    """Run one part; an exception becomes {"error": ...} so the remaining parts still run."""
    started = time.perf_counter()
    try:
        result = part(*args)
    except BaseException as error:  # noqa: BLE001 - a failing part must never end the check
        if isinstance(error, KeyboardInterrupt):
            raise
        result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=6)}
    result["seconds"] = time.perf_counter() - started
    print(f"gpu_check: {name} done in {result['seconds']:.1f} s{' (error)' if 'error' in result else ''}",
          file=sys.stderr, flush=True)
    return result


def run_check(device: torch.device, size_name: str, budget_s: float, only: list[str], save=None) -> dict:
    """The parts named in `only` (all when empty) in turn; save(report) after each, so a run killed
    at its time limit keeps what finished. Parts that would start after budget_s are skipped."""
    size = SIZES[size_name]
    shared: dict = {}
    parts = {  # in PART_NAMES order: the measurements first, the tests are what a short budget loses
        "attention": (part_attention, device, size),
        "step": (part_step, device, size, shared),
        "fp8": (part_fp8, device, size, shared),
        "inference": (part_inference, device, size),
        "tests": (part_tests, device, size),
    }
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "size": size_name, "torch": torch.__version__, "parts": {}}
    started = time.perf_counter()
    for name, call in parts.items():
        if only and name not in only:
            continue
        if time.perf_counter() - started > budget_s:
            report["parts"][name] = {"skipped": f"time budget of {budget_s:.0f} s spent"}
        else:
            report["parts"][name] = guarded(name, *call)
        if save is not None:
            save(report)
    return report


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items())
    return str(value)


def markdown_table(report: dict) -> str:
    """One row per figure: | part | figure | value |; a failed part shows its error."""
    lines = [f"GPU check on {report['device']} ({report['size']}, torch {report['torch']})", "",
             "| part | figure | value |", "|---|---|---|"]
    for part, result in report["parts"].items():
        for key, value in result.items():
            if key != "traceback":
                lines.append(f"| {part} | {key} | {_cell(value).replace('|', '/')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: the dry run of the test suite")
    parser.add_argument("--budget-s", type=float, default=420, help="start no part after this many seconds")
    parser.add_argument("--parts", default="", help=f"comma-separated subset of {', '.join(PART_NAMES)} "
                        "(a rerun of the parts a first run skipped); default: all")
    parser.add_argument("--json", type=Path, default=None, help="write the report here (and a .md beside it)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device; use --device cpu --tiny for the dry run", file=sys.stderr)
        return 2

    def save(report: dict) -> None:
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1))
            args.json.with_suffix(".md").write_text(markdown_table(report) + "\n")

    only = [name for name in args.parts.split(",") if name]
    unknown = set(only) - set(PART_NAMES)
    if unknown:
        print(f"gpu_check: error: unknown parts {sorted(unknown)}; choose from {PART_NAMES}", file=sys.stderr)
        return 2
    report = run_check(torch.device(args.device), "tiny" if args.tiny else "full", args.budget_s, only, save)
    print(json.dumps(report, indent=1))
    print(markdown_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The numbers of one logging window: loss terms and gradient norm summed per step, real tokens
counted, and turned into the logged means (over steps and data-parallel ranks), tokens/s, step
time, the time the loop waited for data, peak memory, and model TFLOP/s and MFU per GPU (model
FLOPs by parallelism/flops.py, the one FLOPs model of the project)."""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence

import torch

from lbva.models.config import ModelConfig
from lbva.models.masks import NOISY
from lbva.parallelism.flops import SequenceMix, training_flops_per_token
from lbva.parallelism.plan import GPU_TYPES

from .config import TrainConfig
from .data.packing import PackedSequence
from .distributed import mean_over
from .step import LossTerms


def loss_metrics(terms: LossTerms | None) -> dict[str, float]:
    """The logged loss terms; empty on a pipeline rank without the last stage (the logging rank
    is one that has it)."""
    if terms is None:
        return {}
    metrics = {"loss": terms.total.item(), "loss_video": terms.video.item(), "loss_action": terms.action.item()}
    if terms.forward_dynamics is not None:
        metrics["loss_fdm"] = terms.forward_dynamics.item()
    return metrics


def model_flops_per_token(model: ModelConfig, config: TrainConfig, sample: PackedSequence) -> float:
    """Training FLOPs per real token of the run's sequences: the FLOPs model's SequenceMix with the
    configured budget, windows, text length and objective ranges, and the tokens per latent frame
    of `sample` (one packed sequence of the run's data)."""
    video_frames = {(int(s), int(f)) for s, f, r in zip(sample.video_sample, sample.video_frame, sample.video_role)
                    if r == NOISY}
    action_frames = {(int(s), int(f)) for s, f, r in zip(sample.action_sample, sample.action_frame,
                                                        sample.action_role) if r == NOISY}
    mix = SequenceMix(
        token_budget=config.data.token_budget,
        video_tokens_per_frame=max(1, int((sample.video_role == NOISY).sum()) // max(len(video_frames), 1)),
        actions_per_frame=int((sample.action_role == NOISY).sum()) // max(len(action_frames), 1),
        window_frames=config.data.window_frames, text_tokens=config.data.text_tokens,
        chunk_sizes=tuple(config.objective.chunk_size), attention_windows=tuple(config.objective.attention_window),
        forward_dynamics=config.objective.forward_dynamics_weight > 0, pad_multiple=config.data.pad_multiple,
    )
    return training_flops_per_token(model, mix)


def peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of this GPU when it is a type the planner knows, else None (no MFU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    return next((gpu.peak_bf16_tflops for key, gpu in GPU_TYPES.items() if key in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """The CUDA allocator's peak since the last reset on GPUs; the process's peak RSS on CPUs."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsWindow:
    def __init__(self, log_every: int, total_steps: int, dp_size: int, *, world_size: int = 1,
                 flops_per_token: float = 0.0, peak_tflops: float | None = None) -> None:
        self.log_every, self.total_steps, self.dp_size = log_every, total_steps, dp_size
        self.world_size, self.flops_per_token, self.peak_tflops = world_size, flops_per_token, peak_tflops
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.skipped = 0
        self.tokens = 0
        self.data_wait = 0.0
        self.started = time.perf_counter()

    def add(self, terms: LossTerms | None, grad_norm: float, seqs: Sequence[PackedSequence],
            data_wait_s: float = 0.0, skipped: bool = False) -> None:
        """One step's numbers; a step the non-finite guard skipped counts in `skipped_steps` and
        time, and its (non-finite) losses and gradient norm stay out of the means."""
        if skipped:
            self.skipped += 1
        else:
            for key, value in {**loss_metrics(terms), "grad_norm": grad_norm}.items():
                self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1
        self.tokens += sum(seq.real_tokens for seq in seqs)
        self.data_wait += data_wait_s

    def due(self, step: int) -> bool:
        """Whether `step` closes a window (every log_every steps, and the run's last step)."""
        return step % self.log_every == 0 or step == self.total_steps

    def close(self, dp_group, device: torch.device, **extra: float) -> dict[str, float]:
        """The window's metrics, equal on every rank of dp_group, plus `extra`; starts the next window."""
        elapsed = time.perf_counter() - self.started
        counted = self.steps - self.skipped  # the same on every rank: the guard's decision is agreed
        nan = float("nan")
        metrics = {key: mean_over(total / counted, dp_group, device) for key, total in self.sums.items()}
        # grad_norm is global already; tokens add up over the data-parallel ranks.
        metrics["grad_norm"] = self.sums["grad_norm"] / counted if counted else nan
        metrics["skipped_steps"] = float(self.skipped)
        tokens_per_s = mean_over(self.tokens / elapsed, dp_group, device) * self.dp_size
        metrics.update(extra, tokens_per_s=tokens_per_s)
        tflops = self.flops_per_token * tokens_per_s / self.world_size / 1e12
        metrics.update(step_s=elapsed / self.steps, data_wait_s=mean_over(self.data_wait / self.steps, dp_group, device),
                       tflops_per_gpu=tflops, mem_gib=peak_memory_gib(device))
        if self.peak_tflops:
            metrics["mfu"] = tflops / self.peak_tflops
        self._reset()
        return metrics

"""The plan's memory model against the measured peak of a real training step on the CPU, at
sequences of about 1K, 2K, 4K and 8K tokens.

The step is the trainer's own (training/trainer.py: forward with the spec 2.3 dense masks through
SDPA, flow-matching losses, backward, gradient clipping, AdamW), run in float32 on one packed
sequence, the configuration `memory_estimate` describes with precision "fp32", attention "sdpa"
and no parallelism.

How the peak is measured: tracemalloc does not see torch's C++ allocations, torch 2.13 has no CPU
allocator statistics (torch.cpu has no memory_allocated), and RSS / VmHWM also count glibc's arena
slack and lazily returned pages, which differ between runs. The profiler with profile_memory=True
records every allocation and free of torch's CPU allocator with its size, in order; their running
sum is the exact number of bytes torch holds, and its maximum over the step is the peak.
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from helpers import random_sample
from lbva.models.config import ModelConfig
from lbva.models.mot import LingBotVA
from lbva.parallelism.flops import SequenceMix
from lbva.parallelism.plan import Layout, Workload, memory_estimate
from lbva.training.config import TrainConfig
from lbva.training.optim import build_optimizer
from lbva.training.data.packing import build_packed_sequence, cut_windows
from lbva.parallelism.step_layout import plain_layout
from lbva.training.step import FlowMatchingObjective
from lbva.training.trainer import draw_sequences, train_step

# 6.7M parameters in 2 layers (their fp32 weights, gradients and AdamW moments are a third of the
# peak at 1K tokens, a twentieth at 8K; two layers keep the 8K step to seconds), and sequences of
# 8-frame windows of 64 video tokens per frame (x2 copies) and 8 actions per frame (x2 copies), 16
# text tokens each: 1,152 tokens per window.
CONFIG = ModelConfig(
    layout="mot", num_layers=2, num_heads=6, head_dim=64, video_ffn_dim=1536, action_width=96,
    action_ffn_dim=384, action_io_hidden=64, text_dim=64, freq_dim=64,
)
FRAMES, LATENT_SIDE, ACTIONS_PER_FRAME, TEXT_TOKENS = 8, 16, 8, 16


def _packed_sequence(windows: int):
    generator = torch.Generator().manual_seed(0)
    samples = [
        random_sample(f"a/{i}", generator, frames=FRAMES, height=LATENT_SIDE, width=LATENT_SIDE,
                      actions_per_frame=ACTIONS_PER_FRAME, text_tokens=TEXT_TOKENS, text_dim=CONFIG.text_dim)
        for i in range(windows)
    ]
    windows = [w for s in samples for w in cut_windows(s, FRAMES, 4)]
    return build_packed_sequence(windows, CONFIG.patch_size, pad_multiple=64, forward_dynamics=False)


def _peak_bytes_allocated_during(step) -> int:
    """Peak of torch's CPU allocations during step(), above what was held when it started."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    held = peak = 0
    for event in events:
        held += event.nbytes()  # negative for frees
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("windows", [1, 2, 4, 7], ids=["1K", "2K", "4K", "8K"])
def test_memory_estimate_is_within_10_percent_of_a_measured_cpu_training_step(windows):
    torch.manual_seed(0)
    model = LingBotVA(CONFIG)
    seq = _packed_sequence(windows)
    config = TrainConfig()
    objective = FlowMatchingObjective(config.objective, empty_text=torch.zeros(TEXT_TOKENS, CONFIG.text_dim))
    optimizer = build_optimizer(model, config.optim)
    cpu = torch.device("cpu")
    # Measure a steady-state step, the one to plan for: AdamW's moments already exist. An update
    # with zero gradients creates them as a first step would, for half the time.
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    held_between_steps = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
    )
    def training_step():
        sequences = draw_sequences(objective, [seq], config.run.seed, step=2, dp_rank=0, dp_size=1)
        train_step(model, objective, plain_layout(config.model.attention), sequences, [1.0], config, cpu)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    measured = held_between_steps + _peak_bytes_allocated_during(training_step)

    mix = SequenceMix(
        token_budget=seq.video_x0.shape[0] + seq.action_x0.shape[0],
        video_tokens_per_frame=(LATENT_SIDE // 2) ** 2, actions_per_frame=ACTIONS_PER_FRAME,
        window_frames=FRAMES, text_tokens=TEXT_TOKENS,
    )
    assert (mix.video_tokens, mix.action_tokens) == (seq.video_x0.shape[0], seq.action_x0.shape[0])
    workload = Workload(mix, activation_checkpointing="none", precision="fp32", attention="sdpa")
    predicted = memory_estimate(CONFIG, Layout(), workload).total
    ratio = predicted / measured
    print(f"{mix.tokens} tokens: predicted {predicted / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB, "
          f"ratio {ratio:.3f}")
    assert abs(ratio - 1) < 0.10

"""Compiled depths stay compiled: with `parallel.compile` on, a run of packed sequences whose
lengths change every step, evaluated every 10 steps, compiles each depth method a small, fixed
number of times (one graph for training, one for evaluation), not once per length.

Counted on the CPU with inductor, whose guards are the ones dynamo installs on CUDA too. The
compiled unit is the depth method's code (`TransformerBlock.joint_forward` in the MoT, `forward` in
the shared layout): every depth runs the same code, so its graphs are shared by all depths and
dynamo's cache of that code holds one entry per graph.
"""

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from helpers import random_sample
from lbva.models.blocks import TransformerBlock
from lbva.models.config import get_preset
from lbva.models.mot import LingBotVA
from lbva.parallelism.parallelize import apply_compile
from lbva.parallelism.step_layout import plain_layout
from lbva.training.config import TrainConfig
from lbva.training.data.packing import PackedSequence, build_packed_sequence, cut_windows
from lbva.training.step import FlowMatchingObjective, evaluate_objective, run_objective

CPU = torch.device("cpu")
MAX_GRAPHS_PER_UNIT = 3


def _packed(generator: torch.Generator, text_dim: int) -> PackedSequence:
    """1-3 episodes of 1-5 frames of 8 x 8 latents: video, action and text lengths all vary."""
    samples = [
        random_sample(f"s{i}/0", generator, frames=int(torch.randint(1, 6, (1,), generator=generator)),
                      height=8, width=8, text_dim=text_dim)
        for i in range(int(torch.randint(1, 4, (1,), generator=generator)))
    ]
    windows = [w for s in samples for w in cut_windows(s, s.latents.shape[1], 1)]
    return build_packed_sequence(windows, (1, 2, 2), pad_multiple=32, forward_dynamics=False)


def _train_with_evaluation(preset: str, steps: int, evaluate_every: int) -> set[tuple[int, int, int]]:
    """Training steps and evaluations as the trainer runs them (training/step.py's objective on a
    model in train mode with backward; in eval mode under no_grad), on a model with compiled
    depths. -> the (video, action, text) lengths the steps ran."""
    torch.manual_seed(0)
    config = TrainConfig()
    model = LingBotVA(get_preset(preset))
    apply_compile(model.depths())
    text_dim = model.config.text_dim
    objective = FlowMatchingObjective(config.objective, empty_text=torch.zeros(6, text_dim))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    layout = plain_layout("sdpa")
    generator = torch.Generator().manual_seed(0)
    eval_sequence = _packed(generator, text_dim)
    eval_draws = objective.draw(eval_sequence, torch.Generator().manual_seed(1))
    lengths = set()
    for step in range(steps):
        seq = _packed(generator, text_dim)
        lengths.add((seq.video_x0.shape[0], seq.action_x0.shape[0], seq.text.shape[0]))
        model.train()
        terms = run_objective(objective, model, [(seq, objective.draw(seq, generator))], layout, CPU)
        terms.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % evaluate_every == 0:
            model.eval()
            with torch.no_grad():
                evaluate_objective(objective, model, (eval_sequence, eval_draws), layout, CPU)
    return lengths


def _graphs(method) -> int:
    return len(_debug_get_cache_entry_list(method.__code__))


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_mot_depths_compile_once_for_training_and_once_for_evaluation(fresh_dynamo, monkeypatch):
    # Scalar C++ kernels: a third of the compile time of vectorized ones, and the same graphs.
    monkeypatch.setattr(torch._inductor.config.cpp, "simdlen", 1)
    # Compile in this process: inductor's pool of forked compile workers outlives the test and
    # keeps pytest from exiting (the interpreter waits on them at exit).
    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)
    lengths = _train_with_evaluation("tiny-mot", steps=50, evaluate_every=10)
    assert len(lengths) >= 15  # the lengths really vary
    assert _graphs(TransformerBlock.joint_forward) <= MAX_GRAPHS_PER_UNIT


def test_compiled_shared_layout_depths_do_not_recompile_for_new_lengths(fresh_dynamo, monkeypatch):
    # Dynamo's guards, not inductor's code, decide recompiles; aot_eager keeps this one quick.
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compile(fn, backend="aot_eager", **options))
    lengths = _train_with_evaluation("tiny-shared", steps=12, evaluate_every=5)
    assert len(lengths) >= 6
    assert _graphs(TransformerBlock.forward) <= MAX_GRAPHS_PER_UNIT

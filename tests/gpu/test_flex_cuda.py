"""On CUDA, the compiled FlexAttention kernel training uses matches SDPA with the dense mask on the
spec 2.3 mask of a packed step, forward and backward, in bf16."""

from __future__ import annotations

import pytest
import torch

from helpers import PATCH, random_sample
from lbva.models.attention import flex_kernel, sdpa_kernel
from lbva.models.masks import dense_self_attention_mask, flex_self_attention_mask
from lbva.training.config import TrainConfig
from lbva.training.data.packing import build_packed_sequence, cut_windows
from lbva.training.step import FlowMatchingObjective


def _layout(device):
    generator = torch.Generator().manual_seed(0)
    samples = [random_sample(f"src/{i}", generator, frames=6) for i in range(3)]
    windows = [w for s in samples for w in cut_windows(s, 6, 6)]
    seq = build_packed_sequence(windows, PATCH, pad_multiple=128, forward_dynamics=False)
    objective = FlowMatchingObjective(TrainConfig().objective, empty_text=torch.zeros(6, 32))
    return objective.prepare(seq, objective.draw(seq, generator), PATCH, device).layout


@pytest.mark.gpu
def test_compiled_flex_matches_dense_sdpa_forward_and_backward():
    device = torch.device("cuda")
    layout = _layout(device)
    flex = flex_kernel(flex_self_attention_mask(layout, compile_mask=True), compiled=True)
    dense = sdpa_kernel(dense_self_attention_mask(layout))
    shape = (1, layout.length, 4, 64)
    base = [torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(3)]

    def run(kernel):
        q, k, v = (t.clone().requires_grad_() for t in base)
        out = kernel(q, k, v)
        out.float().square().mean().backward()
        return [out, q.grad, k.grad, v.grad]

    for got, want in zip(run(flex), run(dense), strict=True):
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)

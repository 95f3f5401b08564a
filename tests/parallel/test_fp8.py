"""The FP8 switch: which layers it converts, what it refuses, and the numerics of the conversion."""

import copy
import sys

import pytest
import torch

from lbva.models.config import ModelConfig, get_preset
from lbva.models.mot import LingBotVA
from lbva.parallelism.fp8 import apply_fp8, convert_with_torchao, fp8_linear_names, is_video_block_linear
from lbva.errors import UserError

VIDEO_BLOCK_LINEARS = [
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ffn.net.0.proj", "ffn.net.2",
]


def test_the_filter_selects_exactly_the_video_block_linears_of_tiny_mot():
    model = LingBotVA(get_preset("tiny-mot"))
    expected = [f"blocks.{i}.{name}" for i in range(model.config.num_layers) for name in VIDEO_BLOCK_LINEARS]
    assert sorted(fp8_linear_names(model)) == sorted(expected)


def test_the_filter_leaves_the_action_stream_modulation_embeddings_and_heads_alone():
    model = LingBotVA(get_preset("tiny-mot"))
    kept = [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not is_video_block_linear(m, name)]
    assert any(n.startswith("action_blocks.") for n in kept)
    assert "condition_embedder.time_proj" in kept and "condition_embedder_action.time_proj" in kept
    assert {"patch_embedding_mlp", "proj_out", "action_embedder.linear_1", "action_proj_out.linear_2"} <= set(kept)
    assert not any(n.startswith("blocks.") for n in kept)


def test_the_filter_skips_layers_whose_dims_are_not_multiples_of_16():
    config = ModelConfig(layout="mot", num_layers=1, num_heads=4, head_dim=48, video_ffn_dim=72, action_width=32,
                         action_ffn_dim=64, action_io_hidden=32, text_dim=32, freq_dim=32)
    names = fp8_linear_names(LingBotVA(config))
    assert "blocks.0.attn1.to_q" in names
    assert "blocks.0.ffn.net.0.proj" not in names and "blocks.0.ffn.net.2" not in names


def test_fp8_none_leaves_the_model_as_it_is():
    model = LingBotVA(get_preset("tiny-mot"))
    before = [type(m) for m in model.modules()]
    handle = apply_fp8(model, "none")
    assert [type(m) for m in model.modules()] == before
    with handle.autocast():
        pass


@pytest.mark.parametrize("backend", ["torchao", "te"])
def test_fp8_without_cuda_is_a_user_error_naming_the_option(monkeypatch, backend):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=f"parallel.fp8={backend}.*CUDA"):
        apply_fp8(LingBotVA(get_preset("tiny-mot")), backend, option="parallel.fp8")


def test_an_unknown_backend_is_a_user_error_naming_the_option():
    with pytest.raises(UserError, match="parallel.fp8: unknown FP8 backend 'fp4'"):
        apply_fp8(LingBotVA(get_preset("tiny-mot")), "fp4", option="parallel.fp8")


def _pretend_hopper(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


def test_missing_transformer_engine_is_a_user_error(monkeypatch):
    _pretend_hopper(monkeypatch)
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)
    with pytest.raises(UserError, match="fp8=te needs Transformer Engine"):
        apply_fp8(LingBotVA(get_preset("tiny-mot")), "te")


def test_missing_torchao_is_a_user_error(monkeypatch):
    _pretend_hopper(monkeypatch)
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(UserError, match="fp8=torchao needs torchao"):
        apply_fp8(LingBotVA(get_preset("tiny-mot")), "torchao")


def test_a_gpu_without_fp8_tensor_cores_is_a_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(UserError, match="compute capability >= 8.9.*8.0"):
        apply_fp8(LingBotVA(get_preset("tiny-mot")), "torchao")


def _block_inputs(width: int, tokens: int, device, dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, width, generator=generator)
    proj = torch.randn(1, tokens, 6, width, generator=generator) * 0.1
    text = torch.randn(1, 32, width, generator=generator)
    return x.to(device, dtype).requires_grad_(), proj.to(device), text.to(device, dtype)


def _run_block(block, x, proj, text, head_dim: int):
    """One video block on a single sample: attention over all tokens, no RoPE rotation."""
    from lbva.models.attention import sdpa_kernel

    cos = torch.ones(1, x.shape[1], 1, head_dim // 2, device=x.device)
    sin = torch.zeros_like(cos)
    mod = block.modulation(proj)
    q, k, v = block.attention_inputs(x, mod, (cos, sin))
    out = block.finish(x, sdpa_kernel(None)(q, k, v), mod, text, sdpa_kernel(None))
    out.float().square().mean().backward()
    return out.detach().float(), x.grad.float()


def _compare_block(device, dtype, convert, rel):
    torch.manual_seed(0)
    config = get_preset("demo-mot")
    reference = LingBotVA(config).blocks[0].to(device, dtype)
    converted = copy.deepcopy(reference)
    wrapper = torch.nn.Module()
    wrapper.blocks = torch.nn.ModuleList([converted])  # the filter looks for "blocks.N." names
    handle = convert(wrapper)
    assert type(converted.attn1.to_q).__name__ == "Float8Linear"
    inputs = (config.video_width, 256, device, dtype)
    expected_out, expected_grad = _run_block(reference, *_block_inputs(*inputs), config.head_dim)
    with handle.autocast():
        out, grad = _run_block(converted, *_block_inputs(*inputs), config.head_dim)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert (out - expected_out).norm() / expected_out.norm() < rel
    assert (grad - expected_grad).norm() / expected_grad.norm() < rel
    weight_grad = converted.ffn.net[0].proj.weight.grad
    assert weight_grad is not None and torch.isfinite(weight_grad).all()


def test_torchao_conversion_of_a_block_matches_float32_in_cpu_emulation():
    pytest.importorskip("torchao.float8")
    _compare_block(torch.device("cpu"), torch.float32, lambda m: convert_with_torchao(m, emulate=True), rel=0.05)


@pytest.mark.gpu
def test_torchao_conversion_of_a_block_runs_and_matches_bf16_on_the_gpu():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs FP8 tensor cores (compute capability >= 8.9)")
    pytest.importorskip("torchao.float8")
    _compare_block(torch.device("cuda"), torch.bfloat16, lambda m: apply_fp8(m, "torchao"), rel=0.1)


@pytest.mark.gpu
def test_transformer_engine_conversion_swaps_the_video_block_linears():
    te = pytest.importorskip("transformer_engine.pytorch")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs FP8 tensor cores (compute capability >= 8.9)")
    model = LingBotVA(get_preset("demo-mot")).cuda().to(torch.bfloat16)
    names = fp8_linear_names(model)
    handle = apply_fp8(model, "te")
    modules = dict(model.named_modules())
    assert all(isinstance(modules[name], te.Linear) for name in names)
    x = torch.randn(1, 256, model.config.video_width, device="cuda", dtype=torch.bfloat16)
    with handle.autocast():
        assert torch.isfinite(modules[names[0]](x)).all()

"""`lbva plan`: the FLOPs formula, the mask density, the memory and time model, layouts and CLI."""

import argparse
import math

import pytest
import torch

from helpers import random_sample
from lbva.models.config import get_preset
from lbva.models.info import build_on_meta, parameter_counts
from lbva.models.masks import PADDING, TokenLayout, dense_self_attention_mask
from lbva.parallelism.flops import SequenceMix, forward_flops, mean_attended_keys, training_flops_per_token
from lbva.parallelism.plan import (
    GPU_TYPES, Cluster, Layout, Workload, candidate_layouts, memory_estimate, plan, step_estimate,
)
from lbva.parallelism.plan_cli import register
from lbva.launchers.cli import CommandParser as _Parser
from lbva.errors import UserError
from lbva.training.data.packing import build_packed_sequence, cut_windows

FIVE_B = get_preset("lingbot-va-5b-mot")


def _cluster(gpu="H100", gpus_per_node=8, nodes=1) -> Cluster:
    spec = GPU_TYPES[gpu]
    return Cluster(spec, gpus_per_node, nodes, spec.intra_node_gbps, spec.inter_node_gbps)


def _linear_macs(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> int:
    return sum(m.in_features * m.out_features for name, m in module.named_modules()
               if isinstance(m, torch.nn.Linear) and not name.startswith(skip))


@pytest.mark.parametrize("preset", ["lingbot-va-5b-mot", "lingbot-va-shared", "tiny-mot"])
def test_block_flops_are_twice_the_linear_shapes_of_the_built_model(preset):
    config = get_preset(preset)
    model = build_on_meta(config)
    mix = SequenceMix(token_budget=4096, video_tokens_per_frame=32, actions_per_frame=4, text_tokens=8)
    flops = forward_flops(config, mix, attended_keys=0.0)
    video_path = mix.video_tokens if config.layout == "mot" else mix.tokens
    # Every block Linear runs once per token of its stream, except the text keys and values.
    per_token = 2 * config.num_layers * _linear_macs(model.blocks[0], skip=("attn2.to_k", "attn2.to_v"))
    assert flops.video_blocks == pytest.approx(per_token * video_path)
    cross = model.blocks[0].attn2
    per_text_token = 2 * config.num_layers * (_linear_macs(cross.to_k) + _linear_macs(cross.to_v))
    assert flops.text_keys_values == pytest.approx(per_text_token * mix.text_tokens_total)
    if config.layout == "mot":
        per_action_token = 2 * config.num_layers * _linear_macs(model.action_blocks[0])
        assert flops.action_blocks == pytest.approx(per_action_token * mix.action_tokens)


def test_five_b_mot_costs_about_six_flops_per_video_stream_parameter_per_token():
    mix = SequenceMix()
    per_token = training_flops_per_token(FIVE_B, mix)
    video_stream = parameter_counts(build_on_meta(FIVE_B))["video: blocks"]
    # 6N for the video blocks the tokens mostly pass through, plus attention over ~25% of the keys.
    assert 0.9 * 6 * video_stream < per_token < 1.3 * 6 * video_stream


def _packed_layout(mix: SequenceMix, chunk: int, window: int) -> TokenLayout:
    generator = torch.Generator().manual_seed(0)
    side = int(math.isqrt(mix.video_tokens_per_frame)) * 2
    samples = [random_sample(f"a/{i}", generator, frames=mix.frames_per_window, height=side, width=side,
                             actions_per_frame=mix.actions_per_frame) for i in range(mix.windows)]
    windows = [w for s in samples for w in cut_windows(s, mix.frames_per_window, mix.frames_per_window)]
    seq = build_packed_sequence(windows, (1, 2, 2), pad_multiple=1, forward_dynamics=mix.forward_dynamics)
    return TokenLayout(
        sample_id=torch.cat([seq.video_sample, seq.action_sample])[None],
        chunk_id=torch.cat([2 * (seq.video_frame // chunk), 2 * (seq.action_frame // chunk) + 1])[None],
        role=torch.cat([seq.video_role, seq.action_role])[None],
        window=window,
    )


@pytest.mark.parametrize("forward_dynamics", [False, True])
@pytest.mark.parametrize("chunk, window", [(1, 4), (2, 6), (4, 64)])
def test_mean_attended_keys_counts_the_dense_mask_of_a_packed_sequence(chunk, window, forward_dynamics):
    mix = SequenceMix(token_budget=800, video_tokens_per_frame=16, actions_per_frame=4, window_frames=7,
                      chunk_sizes=(chunk, chunk), attention_windows=(window, window), forward_dynamics=forward_dynamics)
    layout = _packed_layout(mix, chunk, window)
    assert layout.length == mix.tokens and mix.windows > 1
    mask = dense_self_attention_mask(layout)[0, 0]
    real = layout.sample_id[0] != PADDING
    assert mean_attended_keys(mix) == pytest.approx(mask[real][:, real].sum(dim=1).double().mean().item())


def test_mean_attended_keys_averages_over_the_drawn_chunk_sizes_and_windows():
    base = dict(token_budget=2000, video_tokens_per_frame=16, actions_per_frame=4, window_frames=12)
    draws = [mean_attended_keys(SequenceMix(**base, chunk_sizes=(k, k), attention_windows=(w, w)))
             for k in (1, 2) for w in (4, 5, 6)]
    mixed = mean_attended_keys(SequenceMix(**base, chunk_sizes=(1, 2), attention_windows=(4, 6)))
    assert mixed == pytest.approx(sum(draws) / len(draws))


def test_parameter_memory_is_sixteen_bytes_per_parameter_sharded_over_fsdp_and_tensor_parallel():
    counts = parameter_counts(build_on_meta(FIVE_B))
    blocks = counts["video: blocks"] + counts["action: blocks"]
    layout = Layout(dp_shard=4, cp=2, tp=2)
    memory = memory_estimate(FIVE_B, layout, Workload())
    per_gpu = (blocks / 2 + counts["total"] - blocks) / (4 * 2)
    assert memory.parameters == pytest.approx(4 * per_gpu)
    assert memory.parameters + memory.gradients + memory.optimizer == pytest.approx(16 * per_gpu)


def test_an_ema_adds_one_fp32_copy_sharded_like_the_parameters():
    layout = Layout(dp_shard=4, cp=2, tp=2)
    plain, with_ema = (memory_estimate(FIVE_B, layout, Workload(ema=ema)) for ema in (False, True))
    assert with_ema.ema == pytest.approx(plain.parameters)
    assert with_ema.total - plain.total == pytest.approx(plain.parameters)
    assert plain.ema == 0


def test_activation_checkpointing_trades_memory_for_time():
    cluster = _cluster()
    estimates = {mode: step_estimate(FIVE_B, cluster, Layout(dp_shard=8), Workload(activation_checkpointing=mode))
                 for mode in ("none", "selective", "full")}
    memory = [estimates[m].memory.activations for m in ("none", "selective", "full")]
    time = [estimates[m].step_s for m in ("none", "selective", "full")]
    assert memory == sorted(memory, reverse=True)
    assert time == sorted(time)
    assert estimates["full"].compute_s == pytest.approx(estimates["none"].compute_s * 4 / 3)
    # Every second depth of 30 (0, 2, ..., 28) recomputes its forward.
    assert estimates["selective"].compute_s == pytest.approx(estimates["none"].compute_s * (3 + 15 / 30) / 3)


def test_context_and_tensor_parallel_divide_the_activations():
    workload = Workload(activation_checkpointing="none")
    alone = memory_estimate(FIVE_B, Layout(), workload).activations
    assert memory_estimate(FIVE_B, Layout(cp=4), workload).activations == pytest.approx(alone / 4, rel=0.02)
    with_tp = memory_estimate(FIVE_B, Layout(tp=4), workload).activations
    assert alone / 4 < with_tp < alone / 2  # TP keeps the gathered inputs of its column-parallel linears


def test_pipeline_bubble_follows_1f1b_and_shrinks_with_virtual_stages():
    cluster = _cluster(nodes=2)
    workload = Workload(sequences_per_gpu=2)
    one_f_one_b = step_estimate(FIVE_B, cluster, Layout(pp=2, dp_shard=8), workload)
    interleaved = step_estimate(FIVE_B, cluster, Layout(pp=2, dp_shard=8, virtual_stages=3), workload)
    micro_batches = 2 * 2  # sequences per GPU x pipeline stages
    assert one_f_one_b.bubble == pytest.approx(1 / (micro_batches + 1))
    assert interleaved.bubble == pytest.approx(one_f_one_b.bubble / 3)


def test_fsdp_across_nodes_exposes_more_communication_than_within_a_node():
    workload = Workload(sequences_per_gpu=1, activation_checkpointing="none")
    within = step_estimate(FIVE_B, _cluster(nodes=2), Layout(dp_replicate=2, dp_shard=8), workload)
    across = step_estimate(FIVE_B, _cluster(nodes=2), Layout(dp_shard=16), workload)
    assert across.exposed_comm_s["fsdp"] > within.exposed_comm_s["fsdp"]


def test_throughput_and_mfu_agree_with_the_flops_formula():
    cluster = _cluster()
    estimate = step_estimate(FIVE_B, cluster, Layout(dp_shard=8), Workload())
    flops = training_flops_per_token(FIVE_B, SequenceMix())
    assert estimate.mfu == pytest.approx(estimate.tokens_per_s_per_gpu * flops / (cluster.gpu.peak_bf16_tflops * 1e12))


def test_candidate_layouts_obey_the_mesh_rules():
    cluster = _cluster(nodes=2)
    layouts = candidate_layouts(FIVE_B, cluster, Workload())
    assert Layout(dp_shard=16) in layouts and Layout(pp=2, dp_shard=8, virtual_stages=3) not in layouts
    for layout in layouts:
        assert layout.pp * layout.dp_replicate * layout.dp_shard * layout.cp * layout.tp == cluster.world_size
        assert layout.tp <= cluster.gpus_per_node
        assert FIVE_B.num_heads % (layout.tp * layout.cp) == 0
        assert FIVE_B.num_layers % (layout.pp * layout.virtual_stages) == 0


def test_plan_keeps_only_fitting_layouts_fastest_first():
    cluster = _cluster()
    results = plan(FIVE_B, cluster, Workload(activation_checkpointing="none"))
    assert results
    limit = cluster.gpu.memory_gib * 2**30
    assert all(r.memory.total < limit for r in results)
    speeds = [r.tokens_per_s_per_gpu for r in results]
    assert speeds == sorted(speeds, reverse=True)
    # Without checkpointing a whole 10K-token sequence does not fit on one H100 beside its share of the model.
    assert Layout(dp_shard=8) not in [r.layout for r in results]


def test_five_b_mot_on_eight_h100_predicts_a_plausible_mfu():
    best = plan(FIVE_B, _cluster(), Workload())[0]
    assert 0.30 < best.mfu < 0.55


def _run_cli(*argv: str) -> None:
    parser = _Parser(prog="lbva")
    register(parser.add_subparsers(dest="command", required=True, parser_class=_Parser))
    args = parser.parse_args(["plan", *argv])
    args.func(args)


def test_cli_prints_the_best_layouts_and_the_memory_breakdown(capsys):
    _run_cli("--preset", "lingbot-va-5b-mot", "--gpu", "H100", "--gpus-per-node", "8", "--nodes", "2", "--top", "3")
    out = capsys.readouterr().out
    assert "tok/s/GPU" in out and "MFU" in out and "optimizer" in out and "activations" in out
    table = out.split("tok/s/GPU")[1].split("memory per GPU")[0].strip().splitlines()[1:]
    assert len(table) == 3


@pytest.mark.parametrize("argv, option", [
    (["--preset", "nope"], "--preset"),
    (["--preset", "tiny-mot", "--gpu", "V100"], "--gpu"),
    (["--preset", "tiny-mot", "--nodes", "0"], "--nodes"),
    (["--preset", "tiny-mot", "--token-budget", "100"], "--token-budget"),
    (["--preset", "tiny-mot", "--efficiency", "1.5"], "--efficiency"),
    (["--preset", "tiny-mot", "--nodes", "two"], "--nodes"),
    (["--preset", "tiny-mot", "--activation-checkpointing", "some"], "--activation-checkpointing"),
])
def test_cli_rejects_bad_input_naming_the_option(argv, option):
    with pytest.raises(UserError, match=option):
        _run_cli(*argv)


def test_cli_says_when_nothing_fits():
    with pytest.raises(UserError, match="no layout fits"):
        _run_cli("--preset", "lingbot-va-5b-mot", "--gpu", "A100", "--gpus-per-node", "1", "--nodes", "1")


def test_register_adds_a_plan_subcommand():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert parser.parse_args(["plan", "--preset", "tiny-mot"]).preset == "tiny-mot"


def test_gpu_names_are_case_insensitive(capsys):
    _run_cli("--preset", "tiny-mot", "--gpu", "h100", "--top", "1")
    assert "x 8 H100 (" in capsys.readouterr().out


def _plan_config(tmp_path, text: str, *argv: str) -> tuple[int, str, str]:
    from lbva.launchers.cli import main

    config = tmp_path / "recipe.toml"
    config.write_text(text)
    return main(["plan", "--config", str(config), *argv])


RECIPE = """
[model]
preset = "lingbot-va-5b-mot"
[run]
steps = 1000
[parallel]
dp_replicate = 2
dp_shard = 8
activation_checkpoint = "full"
"""


def test_plan_config_plans_the_recipes_own_layout_and_run(tmp_path, capsys):
    assert _plan_config(tmp_path, RECIPE, "--gpu", "h200") == 0
    out = capsys.readouterr().out
    expected = step_estimate(get_preset("lingbot-va-5b-mot"), _cluster("H200", nodes=2), Layout(dp_replicate=2, dp_shard=8),
                             Workload())
    assert "on 2 x 8 H200" in out
    assert f"  1      2        8   1   1               -     {expected.memory.total / 2**30:.1f}" in out
    assert f"predicted {expected.step_s:.2f} s" in out
    assert "step: 16 sequences = 159,744 tokens" in out  # 16 data-parallel ranks x 9,984 tokens
    assert f"{1000 * expected.step_s / 3600 * 16:,.0f} GPU-hours" in out


def test_plan_config_counts_the_recipes_ema(tmp_path, capsys):
    assert _plan_config(tmp_path, RECIPE, "optim.ema_decay=0.999") == 0
    out = capsys.readouterr().out
    expected = memory_estimate(get_preset("lingbot-va-5b-mot"), Layout(dp_replicate=2, dp_shard=8), Workload(ema=True))
    assert f"  ema            {expected.ema / 2**30:>7.1f}" in out
    assert _plan_config(tmp_path, RECIPE, "--ema") == 2  # a user error: the recipe sets it
    assert "--ema: with --config the recipe sets this" in capsys.readouterr().err


def test_plan_config_takes_overrides_and_counts_a_shared_sequence_once(tmp_path, capsys):
    assert _plan_config(tmp_path, RECIPE, "parallel.dp_shard=4", "parallel.cp=2") == 0
    out = capsys.readouterr().out
    assert "0.5 per GPU per step" in out and "step: 8 sequences" in out


def test_plan_config_needs_nodes_when_the_layout_leaves_dp_shard_open(tmp_path, capsys):
    assert _plan_config(tmp_path, RECIPE, "parallel.dp_shard=-1") == 2
    assert "give --nodes" in capsys.readouterr().err
    assert _plan_config(tmp_path, RECIPE, "parallel.dp_shard=-1", "--nodes", "4") == 0
    assert "on 4 x 8 H100" in capsys.readouterr().out


def test_plan_config_refuses_an_allocation_its_layout_does_not_fill(tmp_path, capsys):
    assert _plan_config(tmp_path, RECIPE, "--nodes", "3") == 2
    assert "on 24 GPUs: parallel:" in capsys.readouterr().err


def test_plan_config_refuses_workload_flags_the_recipe_sets(tmp_path, capsys):
    assert _plan_config(tmp_path, RECIPE, "--token-budget", "4096") == 2
    assert "--token-budget: with --config the recipe sets this" in capsys.readouterr().err


def test_overrides_without_a_config_are_a_user_error(capsys):
    from lbva.launchers.cli import main

    assert main(["plan", "--preset", "tiny-mot", "parallel.tp=2"]) == 2
    assert "apply to a --config" in capsys.readouterr().err

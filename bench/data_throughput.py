"""Packed-data throughput per loader worker against what one H100 consumes.

    python bench/data_throughput.py [--episodes 24 --steps 40 --workers 0,1,2 --repeats 3 --json FILE]

Writes a synthetic prepared dataset of realistic per-sample size (3 cameras x 256x256 -> latents
[48, F, 16, 48] fp16 -> 192 video tokens per latent frame; 16 actions per frame; text 512 x 4096
fp16 stored once per unique text), streams it through PackedLoader with packing into 10,240-token
sequences, and reports real tokens/s per loader worker (num_workers 0 = the main process alone;
with workers, the main process only receives). Each setting is timed `repeats` times and the
median is reported, with the load average, since other processes may share the machine.

GPU side, for the `lingbot-va-5b-mot` preset at 40% MFU of an H100 SXM (989 TFLOP/s bf16 dense):
the model FLOPs per real token of parallelism/flops.py (the one convention of `lbva plan` and
bench/step_throughput.py), with the mean number of keys a query attends measured on this
benchmark's packed sequences under the spec 2.3 mask, K ~ U{1..4}, W ~ U{4..64}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset
from safetensors.torch import save_file

from lbva.models.config import get_preset
from lbva.models.masks import TokenLayout, self_attention_rule
from lbva.parallelism.flops import SequenceMix, training_flops_per_token
from lbva.training.data.format import EMPTY_TEXT_ID, SampleMeta, encode_members, sample_key, text_id
from lbva.training.data.loader import PackedLoader, PreparedStream

PRESET = "lingbot-va-5b-mot"
H100_BF16_PEAK, MFU = 989e12, 0.40
LATENT_SHAPE = (48, 16, 48)  # channels, height, width of 3 tiled 256x256 cameras
ACTIONS_PER_FRAME, TEXT_SHAPE, TEXT_TOKENS = 16, (512, 4096), 512
TOKEN_BUDGET, WINDOW_FRAMES, CHUNK_MULTIPLE, PAD_MULTIPLE = 10240, 64, 4, 128


def write_dataset(root: Path, sources: int, episodes: int, texts: int, seed: int = 0) -> int:
    """Returns the bytes written. Episodes have 20..100 latent frames (about 6..30 s of video)."""
    generator = np.random.default_rng(seed)
    channels, height, width = LATENT_SHAPE
    tokens_per_frame = (height // 2) * (width // 2) + ACTIONS_PER_FRAME
    for s in range(sources):
        source = f"source{s}"
        for folder in ("shards", "index", "texts"):
            (root / folder / source).mkdir(parents=True, exist_ok=True)
        embeddings = {EMPTY_TEXT_ID: torch.zeros(1, TEXT_SHAPE[1], dtype=torch.float16)}
        lines = []
        writer = webdataset.ShardWriter(str(root / "shards" / source / "t000-%05d.tar"), maxcount=8, verbose=0)
        for episode in range(episodes):
            frames = int(generator.integers(20, 101))
            text = f"{source} task {episode % texts}"
            embeddings.setdefault(text_id(text), torch.randn(TEXT_SHAPE, dtype=torch.float16))
            latents = generator.standard_normal((channels, frames, height, width), dtype=np.float32)
            actions = generator.uniform(-1, 1, (30, frames, ACTIONS_PER_FRAME)).astype(np.float32)
            key = sample_key(source, episode, 0)
            meta = SampleMeta(key, source, episode, 0, 0, 16 * frames, 50, 12, text, text_id(text), frames,
                              tokens_per_frame)
            writer.write(encode_members(latents, actions, np.ones(30, dtype=bool), meta))
            lines.append(json.dumps({"key": key, "source": source, "shard": str(Path(writer.fname).relative_to(root)),
                                     "episode": episode, "frames": frames, "tokens": frames * tokens_per_frame}))
        writer.close()
        (root / "index" / source / "t000.jsonl").write_text("\n".join(lines) + "\n")
        save_file(embeddings, str(root / "texts" / source / "t000.safetensors"))
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def make_stream(root: Path) -> PreparedStream:
    return PreparedStream(
        [root], seed=0, patch=(1, 2, 2), latent_channels=LATENT_SHAPE[0], text_tokens=TEXT_TOKENS,
        token_budget=TOKEN_BUDGET, window_frames=WINDOW_FRAMES, chunk_multiple=CHUNK_MULTIPLE,
        pad_multiple=PAD_MULTIPLE, forward_dynamics=False,
    )


def loader_tokens_per_second(root: Path, workers: int, steps: int, warmup: int = 3) -> float:
    iterator = iter(PackedLoader(make_stream(root), num_workers=workers))
    for _ in range(warmup):  # worker start-up and the first shard scans are not steady state
        next(iterator)
    started, tokens = time.perf_counter(), 0
    for _ in range(steps):
        tokens += next(iterator).real_tokens
    return tokens / (time.perf_counter() - started)


def plan_rate_and_efficiency(root: Path, sequences: int) -> tuple[float, float]:
    """Planned sequences per second (metadata only) and mean real tokens / budget."""
    plan = make_stream(root).plan
    started, used = time.perf_counter(), 0
    for planned, _ in zip(plan.sequences(plan.start()), range(sequences)):
        used += sum(w.frames * plan.cost.per_frame(w.sample) for w in planned.windows)
    return sequences / (time.perf_counter() - started), used / (sequences * TOKEN_BUDGET)


def attended_keys(root: Path, sequences: int, draws: int, seed: int = 0) -> float:
    """Mean keys a real query attends under the self-attention mask, over packed sequences and
    (K, W) draws."""
    generator = torch.Generator().manual_seed(seed)
    iterator = iter(PackedLoader(make_stream(root)))
    means = []
    for _ in range(sequences):
        seq = next(iterator)
        for _ in range(draws):
            k = int(torch.randint(1, 5, (1,), generator=generator))
            w = int(torch.randint(4, 65, (1,), generator=generator))
            layout = TokenLayout(
                sample_id=torch.cat([seq.video_sample, seq.action_sample])[None],
                chunk_id=torch.cat([2 * (seq.video_frame // k), 2 * (seq.action_frame // k) + 1])[None],
                role=torch.cat([seq.video_role, seq.action_role])[None],
                window=w,
            )
            real = layout.sample_id[0] >= 0
            keys = torch.arange(layout.length)[None, :]
            allowed = 0
            for rows in torch.arange(layout.length).split(512):  # 512 query rows at a time bound memory
                allowed += int((self_attention_rule(layout, 0, rows[:, None], keys) & real[rows][:, None]).sum())
            means.append(allowed / int(real.sum()))
    return float(np.mean(means))


def gpu_tokens_per_second(keys: float) -> tuple[float, float]:
    """(model FLOPs per token by parallelism/flops.py, tokens/s of one H100 at MFU)."""
    mix = SequenceMix(
        token_budget=TOKEN_BUDGET, video_tokens_per_frame=(LATENT_SHAPE[1] // 2) * (LATENT_SHAPE[2] // 2),
        actions_per_frame=ACTIONS_PER_FRAME, window_frames=WINDOW_FRAMES, text_tokens=TEXT_TOKENS,
        pad_multiple=PAD_MULTIPLE,
    )
    flops_per_token = training_flops_per_token(get_preset(PRESET), mix, attended_keys=keys)
    return flops_per_token, MFU * H100_BF16_PEAK / flops_per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=24, help="episodes per source")
    parser.add_argument("--texts", type=int, default=4, help="unique texts per source")
    parser.add_argument("--steps", type=int, default=40, help="timed sequences per loader setting")
    parser.add_argument("--workers", default="0,1,2", help="loader worker counts to time")
    parser.add_argument("--repeats", type=int, default=3, help="timings per worker count (median reported)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        size = write_dataset(root, args.sources, args.episodes, args.texts)
        keys = attended_keys(root, sequences=2, draws=4)
        flops_per_token, gpu_rate = gpu_tokens_per_second(keys)
        plan_rate, efficiency = plan_rate_and_efficiency(root, 2000)
        load = os.getloadavg()
        rows = []
        for workers in map(int, args.workers.split(",")):
            rate = statistics.median(loader_tokens_per_second(root, workers, args.steps) for _ in range(args.repeats))
            per_worker = rate / max(workers, 1)
            rows.append({"num_workers": workers, "tokens_per_s": rate, "tokens_per_s_per_worker": per_worker,
                         "per_worker_vs_gpu": per_worker / gpu_rate})

    print(f"load average before timing: {load[0]:.2f} (1 min), {os.cpu_count()} CPUs")
    print(f"dataset: {args.sources} sources x {args.episodes} episodes, {size / 1e6:.0f} MB; "
          f"budget {TOKEN_BUDGET} tokens")
    print(f"packing efficiency (real tokens / budget): {efficiency:.3f}; plan: {plan_rate:,.0f} sequences/s (metadata)")
    print(f"keys per query: {keys:,.0f}; FLOPs/token (parallelism/flops.py): {flops_per_token / 1e9:.2f} G; "
          f"H100 at {MFU:.0%} MFU consumes {gpu_rate:,.0f} tokens/s")
    print(f"{'workers':>8} {'tokens/s':>12} {'per worker':>12} {'x one GPU':>10}")
    for row in rows:
        print(f"{row['num_workers']:>8} {row['tokens_per_s']:>12,.0f} {row['tokens_per_s_per_worker']:>12,.0f} "
              f"{row['per_worker_vs_gpu']:>10.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "load_average": load[0], "dataset_bytes": size, "packing_efficiency": efficiency,
            "plan_sequences_per_s": plan_rate,
            "attended_keys": keys, "flops_per_token": flops_per_token, "gpu_tokens_per_s": gpu_rate, "loader": rows,
        }, indent=1))


if __name__ == "__main__":
    main()

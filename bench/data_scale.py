"""The data index at corpus scale: start-up time and memory of one process over N samples, a resume
far into the plan, and what a window read costs against a whole-sample read.

    python bench/data_scale.py --samples 3000000 --json OUT.json [--workdir DIR]

1. Index. Writes, for `--sources` sources of N / sources samples each, the columnar index
   (index/{source}/columns.idx, index.py) directly, without shards: episodes of 2..600 latent
   frames (log-normal, mean about 50: 16,000 hours at 10 fps and 4x temporal compression is about
   150 M latent frames in about 3 M samples), 208 tokens per frame, 256 samples per shard. One
   source's jsonl lines are also written and `table_from_jsonl` timed on them (what `lbva data
   index` and prepare pay per source, once).
2. Start-up, each in a fresh process: imports (not counted), then read_index + DataPlan + the first
   planned sequence: `open_s` (read_index), `plan_ready_s` (all of it), `rss_mib` (resident memory
   added, and how much of it is shared file pages of the memory-mapped tables). `far_resume_s` is the
   same in a process that restores a loader state at consumed sequence 10,000,000 and plans its first
   sequence; its cursor is made, not replayed (block = 10 M / sequences per block, draws by the
   mixture shares), which is what a checkpoint holds and all that a restore reads.
3. Reading. A real dataset of `--long-episodes` long episodes (300..600 latent frames of
   [48, 16, 48] fp16 latents, 16 actions per frame) is planned with 10,240-token sequences and
   windows cut at the budget, and loaded in this process (one loader worker's work): before =
   every distinct sample of a sequence read whole, then cut (the loader before windows read their
   frames); after = PreparedStream._load, each window reading its frames. Reported: bytes asked of
   the file system per real token and real tokens/s, both from the page cache (just written).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SEQUENCES_AT_RESUME = 10_000_000
TOKENS_PER_FRAME = 208  # 192 video tokens (48x16x48 latents, patch 1x2x2) + 16 actions
SHARD_SAMPLES = 256
LATENT_SHAPE = (48, 16, 48)
ACTIONS_PER_FRAME, TEXT_SHAPE, TEXT_TOKENS = 16, (512, 4096), 512
TOKEN_BUDGET, WINDOW_FRAMES, CHUNK_MULTIPLE, PAD_MULTIPLE = 10240, 64, 4, 128
PLAN = dict(weights=None, seed=0, token_budget=TOKEN_BUDGET, window_frames=WINDOW_FRAMES,
            chunk_multiple=CHUNK_MULTIPLE, forward_dynamics=False)


def _frames(generator: np.random.Generator, count: int) -> np.ndarray:
    return np.clip(np.rint(generator.lognormal(np.log(38.0), 0.75, count)), 2, 600).astype(np.int64)


def write_index(root: Path, samples: int, sources: int, seed: int = 0) -> dict:
    """The synthetic columnar index; returns its totals."""
    from lbva.training.data.format import sample_key
    from lbva.training.data.index import IndexTable, table_path

    generator = np.random.default_rng(seed)
    frames_total, size = 0, 0
    for s in range(sources):
        name = f"source{s}"
        count = samples // sources + (1 if s < samples % sources else 0)
        frames = _frames(generator, count)
        shard_ids = np.arange(count) // SHARD_SAMPLES
        shards = [f"shards/{name}/t000-{n:05d}.tar" for n in range(int(shard_ids[-1]) + 1)]
        sizes = frames * (np.prod(LATENT_SHAPE) * 2 + 30 * ACTIONS_PER_FRAME * 4) + 8192
        offsets = np.zeros(count, np.int64)
        for shard in range(len(shards)):  # byte ranges laid end to end within each shard
            rows = slice(shard * SHARD_SAMPLES, (shard + 1) * SHARD_SAMPLES)
            offsets[rows] = np.concatenate([[0], np.cumsum(sizes[rows])[:-1]])
        table = IndexTable.from_rows([sample_key(name, e, 0) for e in range(count)], shards, shard_ids,
                                     np.arange(count), frames, np.full(count, TOKENS_PER_FRAME), offsets, sizes)
        path = table_path(root, name)
        table.write(path)
        (root / "shards" / name).mkdir(parents=True, exist_ok=True)
        frames_total += int(frames.sum())
        size += path.stat().st_size
    return {"latent_frames": frames_total, "index_bytes": size}


def time_jsonl_build(root: Path, samples: int, seed: int = 1) -> float:
    """Seconds table_from_jsonl takes over `samples` jsonl lines of one source."""
    from lbva.training.data.index import table_from_jsonl

    folder = root / "index" / "lines"
    folder.mkdir(parents=True, exist_ok=True)
    frames = _frames(np.random.default_rng(seed), samples)
    with open(folder / "t000.jsonl", "w") as out:
        for e, f in enumerate(frames.tolist()):
            out.write(json.dumps({"key": f"lines__e{e:07d}__s000", "source": "lines",
                                  "shard": f"shards/lines/t000-{e // SHARD_SAMPLES:05d}.tar", "episode": e,
                                  "frames": f, "tokens": f * TOKENS_PER_FRAME, "offset": 0, "size": 1}) + "\n")
    started = time.perf_counter()
    table_from_jsonl(root, "lines")
    return time.perf_counter() - started


def _memory() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def measure_startup(root: Path, consumed: int) -> dict:
    """In this (fresh) process: open the index, build the plan, restore a state at `consumed`
    (0: a fresh start) and plan the first sequence from there."""
    from lbva.training.data.plan import DataPlan
    from lbva.training.data.reader import read_index

    before = _memory()
    started = time.perf_counter()
    sources, _ = read_index([root], "fail")
    opened = time.perf_counter()
    plan = DataPlan(sources, **PLAN)
    cursor = plan.start()
    if consumed:
        # What a checkpoint at `consumed` holds: the start of the block around it and the draws
        # per source before that block (the mixture is uniform here, so draws split evenly).
        bins, _ = plan.plan_block(cursor)
        block = consumed // len(bins)
        draws = block * plan.block_samples
        cursor = plan.cursor_from_dict({"block": block, "first_sequence": block * len(bins),
                                        "source_draws": {n: draws // len(sources) for n in plan.names}})
    first = None
    for planned in plan.sequences(cursor):
        if planned.index >= max(consumed, cursor.first_sequence):
            first = planned
            break
    ready = time.perf_counter()
    after = _memory()
    return {"open_s": opened - started, "plan_ready_s": ready - started, "first_sequence": first.index,
            "rss_mib": (after["VmRSS"] - before["VmRSS"]) / 2**20,
            "rss_anon_mib": (after["RssAnon"] - before["RssAnon"]) / 2**20,
            "rss_file_mib": (after["RssFile"] - before["RssFile"]) / 2**20,
            "samples": sum(len(s) for s in sources)}


def _in_fresh_process(root: Path, consumed: int) -> dict:
    command = [sys.executable, __file__, "--measure", str(root), "--consumed", str(consumed)]
    done = subprocess.run(command, check=True, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(done.stdout.splitlines()[-1])


def write_long_episodes(root: Path, episodes: int, seed: int = 0) -> int:
    """A real prepared dataset (shards, byte ranges, texts, columnar index) of long episodes."""
    import torch
    import webdataset
    from safetensors.torch import save_file

    from lbva.training.data.format import EMPTY_TEXT_ID, SampleMeta, encode_members, sample_key, text_id
    from lbva.training.data.index import build_table
    from lbva.training.data.writer import shard_lines

    generator = np.random.default_rng(seed)
    channels, height, width = LATENT_SHAPE
    source = "long"
    for folder in ("shards", "index", "texts"):
        (root / folder / source).mkdir(parents=True, exist_ok=True)
    embeddings = {EMPTY_TEXT_ID: torch.zeros(1, TEXT_SHAPE[1], dtype=torch.float16)}
    metas: dict[str, list] = {}
    writer = webdataset.ShardWriter(str(root / "shards" / source / "t000-%05d.tar"), maxcount=4, verbose=0)
    for episode in range(episodes):
        frames = int(generator.integers(300, 601))
        text = f"long task {episode % 2}"
        embeddings.setdefault(text_id(text), torch.randn(TEXT_SHAPE, dtype=torch.float16))
        latents = generator.standard_normal((channels, frames, height, width), dtype=np.float32)
        actions = generator.uniform(-1, 1, (30, frames, ACTIONS_PER_FRAME)).astype(np.float32)
        meta = SampleMeta(sample_key(source, episode, 0), source, episode, 0, 0, 4 * frames, 40, 10, text,
                          text_id(text), frames, TOKENS_PER_FRAME)
        writer.write(encode_members(latents, actions, np.ones(30, dtype=bool), meta))
        metas.setdefault(str(Path(writer.fname).relative_to(root)), []).append(meta)
    writer.close()
    lines = [line for shard, shard_metas in metas.items() for line in shard_lines(root, shard, shard_metas)]
    (root / "index" / source / "t000.jsonl").write_text("\n".join(lines) + "\n")
    save_file(embeddings, str(root / "texts" / source / "t000.safetensors"))
    build_table(root, source)
    return sum(f.stat().st_size for f in (root / "shards").rglob("*.tar"))


def measure_reading(root: Path, sequences: int) -> dict:
    """Bytes per real token and tokens/s of one loader worker, whole-sample reads against window reads."""
    from lbva.training.data.loader import PreparedStream
    from lbva.training.data.packing import Window, build_packed_sequence
    from lbva.training.data.reader import SampleReader

    stream = PreparedStream([root], patch=(1, 2, 2), latent_channels=LATENT_SHAPE[0], text_tokens=TEXT_TOKENS,
                            pad_multiple=PAD_MULTIPLE, **{k: v for k, v in PLAN.items() if k != "weights"})
    planned = [p.windows for p, _ in zip(stream.plan.sequences(stream.plan.start()), range(sequences))]
    results = {}
    for mode in ("before", "after"):
        reader = SampleReader(stream.sources, text_tokens=TEXT_TOKENS, latent_channels=LATENT_SHAPE[0],
                              patch=(1, 2, 2))
        started, tokens = time.perf_counter(), 0
        for windows in planned:
            if mode == "after":
                sequence, _ = stream._load(windows, reader)
            else:
                samples = {w.sample.key: None for w in windows}
                for w in windows:
                    if samples[w.sample.key] is None:
                        samples[w.sample.key] = reader.load(w.sample)
                loaded = [Window(samples[w.sample.key], w.start, w.frames) for w in windows]
                sequence = build_packed_sequence(loaded, (1, 2, 2), PAD_MULTIPLE, False)
            tokens += sequence.real_tokens
        elapsed = time.perf_counter() - started
        results[mode] = {"bytes_per_token": reader.shards.bytes_read / tokens, "tokens_per_s": tokens / elapsed,
                         "bytes_read": reader.shards.bytes_read, "real_tokens": tokens}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=3_000_000)
    parser.add_argument("--sources", type=int, default=6)
    parser.add_argument("--long-episodes", type=int, default=8)
    parser.add_argument("--sequences", type=int, default=40, help="packed sequences loaded per reading mode")
    parser.add_argument("--jsonl-samples", type=int, default=None,
                        help="jsonl lines to time a table build on (default: samples / sources)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--consumed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        import torch  # noqa: F401  (imported by every trainer process before its data: not counted)

        import lbva.training.data.loader  # noqa: F401
        print(json.dumps(measure_startup(args.measure, args.consumed)))
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="data_scale_"))
    index_root, long_root, lines_root = work / "index", work / "long", work / "lines"
    started = time.perf_counter()
    totals = write_index(index_root, args.samples, args.sources)
    build_s = time.perf_counter() - started
    jsonl_samples = args.jsonl_samples or args.samples // args.sources
    jsonl_s = time_jsonl_build(lines_root, jsonl_samples)
    fresh = _in_fresh_process(index_root, 0)
    resumed = _in_fresh_process(index_root, SEQUENCES_AT_RESUME)
    shard_bytes = write_long_episodes(long_root, args.long_episodes)
    reading = measure_reading(long_root, args.sequences)
    report = {
        "samples": args.samples, "sources": args.sources, "latent_frames": totals["latent_frames"],
        "index_bytes": totals["index_bytes"], "synthetic_table_write_s": build_s,
        "jsonl_table_build_s": jsonl_s, "jsonl_table_build_samples": jsonl_samples,
        "open_s": fresh["open_s"], "plan_ready_s": fresh["plan_ready_s"], "rss_mib": fresh["rss_mib"],
        "rss_anon_mib": fresh["rss_anon_mib"], "rss_file_mib": fresh["rss_file_mib"],
        "far_resume_s": resumed["plan_ready_s"], "far_resume_sequence": resumed["first_sequence"],
        "far_resume_rss_mib": resumed["rss_mib"],
        "bytes_read_per_token": {mode: r["bytes_per_token"] for mode, r in reading.items()},
        "loader_tokens_per_s_per_worker": {mode: r["tokens_per_s"] for mode, r in reading.items()},
        "long_episode_shard_bytes": shard_bytes, "reading": reading,
        "load_average": os.getloadavg(), "cpus": os.cpu_count(), "workdir": str(work),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

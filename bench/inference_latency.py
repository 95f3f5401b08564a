"""Per-chunk latency and control throughput of the policy server, synchronous vs asynchronous.

    python bench/inference_latency.py --chunks 12 --repeats 3 --exec-fractions 0.5,1,1.5,2 --threads 1
    python bench/inference_latency.py --video-steps 25 --action-steps 50 --chunks 12 --repeats 3 \
        --exec-fractions 1,1.5 --threads 1                      # the RoboTwin sampling steps

A randomly initialised model is exported to an inference bundle and served on localhost; a client
drives episodes over the websocket with stand-in camera images. The robot is simulated: executing
a chunk takes E seconds of wall time, E = fraction x the median synchronous prediction time
(feedback + infer, measured just before each sync/async pair), so the figures do not depend on a
particular robot.

    synchronous   execute chunk c, then feedback(c) + infer(c+1) while the robot waits
    asynchronous  infer(c+1) is requested as soon as chunk c starts executing; the feedback of chunk
                  c-1 (ground truth + forward-dynamics re-imagination of chunk c) and infer(c+1) run
                  while chunk c executes

Control throughput is executed chunks per second of robot time (K*N actions each), from the start
of chunk 0 to the end of the last chunk. Prints one table row per fraction: median latencies, median
throughputs and the median async/sync throughput ratio over alternating episode pairs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lbva.checkpoints_tools.export import write_weights_checkpoint
from lbva.inference.bundle import BundleSpec, export_inference_bundle, load_bundle
from lbva.inference.client import PolicyClient
from lbva.inference.observations import CameraLayout
from lbva.inference.settings import InferenceSettings
from lbva.inference.server import BackgroundServer, ServerOptions
from lbva.models.config import get_preset
from lbva.models.mot import LingBotVA
from lbva.training.data.encoders import EncoderChoice
from lbva.training.data.tiling import make_tiling
from lbva.training.demo_dataset import ActionStats

CAMERAS = ("observation.images.top", "observation.images.wrist")
CHANNELS = (0, 1)
PROMPT = "push the block to the target"


def make_bundle(folder: Path, preset: str, image_size: int, settings: InferenceSettings,
                actions_per_frame: int) -> Path:
    torch.manual_seed(0)
    model = LingBotVA(get_preset(preset))
    checkpoint = write_weights_checkpoint(model, folder / "checkpoint", preset, "benchmark")
    q01, q99 = np.zeros(30), np.zeros(30)
    q01[list(CHANNELS)], q99[list(CHANNELS)] = -1.0, 1.0
    spec = BundleSpec(
        cameras=CameraLayout(CAMERAS, make_tiling("side_by_side", len(CAMERAS), [image_size], [image_size])),
        action_channels=CHANNELS, actions_per_frame=actions_per_frame, stats=ActionStats(q01, q99),
        encoders=EncoderChoice("standin", standin_text_dim=model.config.text_dim), text_tokens=16, defaults=settings)
    return export_inference_bundle(checkpoint, folder / "bundle", spec)


class Robot:
    """Camera images and a clock: executing a chunk takes `seconds` of wall time."""

    def __init__(self, image_size: int, seconds: float) -> None:
        self.rng = np.random.default_rng(0)
        self.size = image_size
        self.seconds = seconds

    def observation(self) -> dict:
        return {key: self.rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8) for key in CAMERAS}

    def keyframes(self, count: int) -> list[dict]:
        return [self.observation() for _ in range(count)]


def _timed(call: Callable[[], object]) -> tuple[object, float]:
    started = time.perf_counter()
    result = call()
    return result, time.perf_counter() - started


def run_sync(client: PolicyClient, robot: Robot, chunks: int, chunk_size: int) -> tuple[float, list[float]]:
    """-> (robot seconds for `chunks` chunks, per-chunk prediction latencies)."""
    client.reset(PROMPT)
    actions = client.infer(robot.observation(), PROMPT)
    latencies = []
    started = time.perf_counter()
    for chunk in range(chunks):
        time.sleep(robot.seconds)  # the robot executes the chunk, the policy idles
        if chunk == chunks - 1:
            break
        frames = 4 * (chunk_size - 1 if chunk == 0 else chunk_size)

        def predict(executed=actions, frames=frames):
            client.feedback(robot.keyframes(frames), executed)
            return client.infer(robot.observation(), PROMPT)

        actions, latency = _timed(predict)
        latencies.append(latency)
    return time.perf_counter() - started, latencies


def run_async(client: PolicyClient, robot: Robot, chunks: int, chunk_size: int) -> tuple[float, list[float]]:
    """-> (robot seconds for `chunks` chunks, per-chunk prediction latencies while executing)."""
    client.reset(PROMPT)
    executing = client.infer(robot.observation(), PROMPT)
    latencies = []
    started = time.perf_counter()
    chunk_start = started
    following, latency = _timed(lambda: client.infer(robot.observation(), PROMPT))  # while chunk 0 executes
    latencies.append(latency)
    for chunk in range(1, chunks):
        time.sleep(max(0.0, chunk_start + robot.seconds - time.perf_counter()))  # chunk-1 done
        chunk_start = time.perf_counter()
        finished, executing = executing, following  # the robot starts `chunk` at once
        if chunk == chunks - 1:
            break
        frames = 4 * (chunk_size - 1 if chunk == 1 else chunk_size)

        def predict(executed=finished, frames=frames):
            client.feedback(robot.keyframes(frames), executed)
            return client.infer(robot.observation(), PROMPT)

        following, latency = _timed(predict)
        latencies.append(latency)
    time.sleep(max(0.0, chunk_start + robot.seconds - time.perf_counter()))
    return time.perf_counter() - started, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo-mot")
    parser.add_argument("--image-size", type=int, default=128, help="pixels per side of each of the 2 cameras")
    parser.add_argument("--chunk-size", type=int, default=4)
    parser.add_argument("--actions-per-frame", type=int, default=8)
    parser.add_argument("--video-steps", type=int, default=5)
    parser.add_argument("--action-steps", type=int, default=10)
    parser.add_argument("--video-stop-sigma", type=float, default=0.0)
    parser.add_argument("--chunks", type=int, default=12, help="chunks per episode")
    parser.add_argument("--exec-fractions", default="0.5,1,2", help="robot time per chunk / sync prediction time")
    parser.add_argument("--repeats", type=int, default=3, help="sync/async episode pairs per fraction")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = InferenceSettings(chunk_size=args.chunk_size, video_steps=args.video_steps,
                                 action_steps=args.action_steps, video_stop_sigma=args.video_stop_sigma)

    with tempfile.TemporaryDirectory() as tmp:
        bundle = make_bundle(Path(tmp), args.preset, args.image_size, settings, args.actions_per_frame)
        runtime = load_bundle(bundle).runtime()
        with BackgroundServer(runtime, ServerOptions(port=0)) as server, \
                PolicyClient(f"ws://127.0.0.1:{server.port}") as client:
            run_sync(client, Robot(args.image_size, 0.0), 3, args.chunk_size)  # warm-up
            rows = []
            for fraction in [float(f) for f in args.exec_fractions.split(",")]:
                runs = []
                for _ in range(args.repeats):
                    # E is set from a sync run without execution time just before each pair, and the
                    # sync and async episodes of a pair run back to back, so load changes on a shared
                    # machine move E, sync and async together.
                    _, latencies = run_sync(client, Robot(args.image_size, 0.0), args.chunks, args.chunk_size)
                    robot = Robot(args.image_size, fraction * statistics.median(latencies))
                    runs.append((robot.seconds, run_sync(client, robot, args.chunks, args.chunk_size),
                                 run_async(client, robot, args.chunks, args.chunk_size)))
                rows.append({
                    "exec_fraction": fraction, "exec_ms": statistics.median(e for e, _, _ in runs) * 1e3,
                    "sync_latency_ms": statistics.median(x for _, (_, lat), _ in runs for x in lat) * 1e3,
                    "async_latency_ms": statistics.median(x for _, _, (_, lat) in runs for x in lat) * 1e3,
                    "sync_chunks_per_s": statistics.median(args.chunks / s for _, (s, _), _ in runs),
                    "async_chunks_per_s": statistics.median(args.chunks / a for _, _, (a, _) in runs),
                    "speedup": statistics.median(s / a for _, (s, _), (a, _) in runs),
                })

    actions = args.chunk_size * args.actions_per_frame
    print(f"preset {args.preset}, {args.threads} threads, 2 cameras {args.image_size}px, K={args.chunk_size}, "
          f"N={args.actions_per_frame} ({actions} actions/chunk), video {args.video_steps} steps "
          f"(stop sigma {args.video_stop_sigma}), actions {args.action_steps} steps, CFG 5/1, {args.chunks} chunks")
    header = ("exec/pred", "exec ms", "sync lat ms", "async lat ms", "sync act/s", "async act/s", "async/sync")
    print(" | ".join(f"{h:>12}" for h in header))
    for r in rows:
        values = (f"{r['exec_fraction']:.2f}", f"{r['exec_ms']:.1f}", f"{r['sync_latency_ms']:.1f}",
                  f"{r['async_latency_ms']:.1f}", f"{r['sync_chunks_per_s'] * actions:.1f}",
                  f"{r['async_chunks_per_s'] * actions:.1f}", f"{r['speedup']:.2f}x")
        print(" | ".join(f"{v:>12}" for v in values))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

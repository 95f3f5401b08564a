"""Per-chunk latency and control throughput of the policy server: synchronous vs asynchronous
control, the chunk with and without the savings of issue #14 item 3, and 4 sessions vs 1.

    python bench/inference_latency.py --chunks 24 --repeats 3 --threads 1
    python bench/inference_latency.py --video-steps 25 --action-steps 50 --chunks 20 --repeats 2 \
        --threads 1                                             # the RoboTwin sampling steps

A randomly initialised model is exported to an inference bundle and served on localhost; a client
drives episodes over the websocket with stand-in camera images. The robot is simulated: executing
a chunk takes E seconds of wall time.

    synchronous   execute chunk c, then feedback(c) + infer(c+1) while the robot waits
    asynchronous  infer(c+1) is requested as soon as chunk c starts executing; the feedback of chunk
                  c-1 (ground truth + forward-dynamics re-imagination of chunk c) and infer(c+1) run
                  while chunk c executes

Control throughput is executed actions per second of robot time (K*N actions per chunk). The
headline figure is the steady state: the rate at which chunks start over the second half of each
episode (from chunk n/2 to the last chunk's start), where the KV cache has filled its attention
window (the default episode is longer than the window) and start-up is over. The whole-episode
figure is printed beside it; it is lower for asynchronous control because an n-chunk episode holds
n-1 predictions either way, which caps its ratio at 2 - 1/n even with a free forward-dynamics pass.

Each repeat first calibrates, on episodes without execution time, the steady-state prediction time
per chunk of both modes (P_sync = feedback + infer, P_async = feedback with the forward-dynamics
pass + infer), then runs one synchronous and one asynchronous episode for each robot time E:

    E = fraction x P_sync    for each --exec-fractions entry (1 = the robot is as slow as the policy)
    E = P_async              the balanced point, where asynchronous control never waits and the
                             ratio peaks at 1 + P_sync / P_async

In steady state sync runs one chunk per E + P_sync and async one per max(E, P_async), so the
ratio at E = P_sync is 2 P_sync / P_async: the forward-dynamics pass (one extra forward per chunk)
is what keeps it below 2. Calibration and the measured episodes of a repeat run back to back, so load
changes on a shared machine move them together; rows report medians over repeats.

Three more figures, measured in the same run (the "chunk", "sessions" and "prediction" entries of
the JSON line):

    chunk      steady-state synchronous prediction time per chunk (feedback + infer) of the runtime
               alone, with every forward in full (`shortcuts=False`: the prompt's projection and
               cross-attention K/V recomputed by each forward, both CFG rows in the unguided action
               loop) and with the shortcuts; before and after alternate within each repeat.
               --text-tokens sets the prompt length (512, the reference's).
    sessions   executed actions per second of robot time, summed over robots, of --sessions robots
               driving one server at once vs one robot alone, each robot as slow as the policy
               (E = P_sync of one robot, calibrated in each repeat): with the server's default
               scheduling of concurrent sessions (inference/scheduling.py; on a CPU as many requests
               at once as the cores hold at --threads) and with one request at a time.
    prediction prediction throughput (chunks per second summed over sessions, no robot time) of
               --sessions in-process sessions predicting at the same moments, each in its own thread
               as the server runs them: one request at a time, as many at once as the cores hold at
               --threads, and batched (every forward of all sessions in one model call through a
               ForwardBatcher, inference/batching.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lbva.checkpoints_tools.export import write_weights_checkpoint
from lbva.inference.batching import ForwardBatcher
from lbva.inference.bundle import BundleSpec, export_inference_bundle, load_bundle
from lbva.inference.client import PolicyClient
from lbva.inference.observations import CameraLayout
from lbva.inference.scheduling import SessionScheduling, cpu_parallel_requests
from lbva.inference.server import BackgroundServer, PolicyServer, ServerOptions
from lbva.inference.settings import InferenceSettings
from lbva.models.action_space import ActionStats
from lbva.models.config import get_preset
from lbva.models.encoders import EncoderChoice
from lbva.models.mot import LingBotVA
from lbva.models.tiling import make_tiling

CAMERAS = ("observation.images.top", "observation.images.wrist")
CHANNELS = (0, 1)
PROMPT = "push the block to the target"


def make_bundle(folder: Path, preset: str, image_size: int, settings: InferenceSettings,
                actions_per_frame: int, text_tokens: int) -> Path:
    torch.manual_seed(0)
    model = LingBotVA(get_preset(preset))
    checkpoint = write_weights_checkpoint(model, folder / "checkpoint", preset, "benchmark")
    q01, q99 = np.zeros(30), np.zeros(30)
    q01[list(CHANNELS)], q99[list(CHANNELS)] = -1.0, 1.0
    spec = BundleSpec(
        cameras=CameraLayout(CAMERAS, make_tiling("side_by_side", len(CAMERAS), [image_size], [image_size])),
        action_channels=CHANNELS, actions_per_frame=actions_per_frame, stats=ActionStats(q01, q99),
        encoders=EncoderChoice("standin", standin_text_dim=model.config.text_dim), text_tokens=text_tokens, defaults=settings)
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


@dataclass
class Episode:
    """Wall-clock record of one episode: when each chunk started executing, when the last ended,
    and the prediction latency (feedback + infer) of each chunk predicted during the episode."""

    starts: list[float] = field(default_factory=list)
    end: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def chunks_per_s(self) -> float:
        """Executed chunks per second over the whole episode, first start to last end."""
        return len(self.starts) / (self.end - self.starts[0])

    def steady_chunks_per_s(self, first: int) -> float:
        """Chunk starts per second from the start of chunk `first` to the start of the last chunk:
        the control rate of a robot that keeps going, without the episode's last chunk, after
        which neither mode predicts anything."""
        return (len(self.starts) - 1 - first) / (self.starts[-1] - self.starts[first])

    def steady_latency(self) -> float:
        """Mean prediction latency over the second half of the episode (the cache window is full)."""
        return statistics.mean(self.latencies[len(self.latencies) // 2:])


def _timed(call: Callable[[], object], latencies: list[float]) -> object:
    started = time.perf_counter()
    result = call()
    latencies.append(time.perf_counter() - started)
    return result


def _feedback_and_infer(client: PolicyClient, robot: Robot, executed: np.ndarray, chunk: int,
                        chunk_size: int) -> np.ndarray:
    """Ground `chunk` (its keyframes: 4 per latent frame, 4(K-1) for chunk 0) and infer the next."""
    client.feedback(robot.keyframes(4 * (chunk_size - 1 if chunk == 0 else chunk_size)), executed)
    return client.infer(robot.observation(), PROMPT)


def run_sync(client: PolicyClient, robot: Robot, chunks: int, chunk_size: int) -> Episode:
    episode = Episode()
    client.reset(PROMPT)
    actions = client.infer(robot.observation(), PROMPT)
    for chunk in range(chunks):
        episode.starts.append(time.perf_counter())
        time.sleep(robot.seconds)  # the robot executes the chunk, the policy idles
        if chunk == chunks - 1:
            break
        actions = _timed(lambda a=actions, c=chunk: _feedback_and_infer(client, robot, a, c, chunk_size),
                         episode.latencies)
    episode.end = time.perf_counter()
    return episode


def run_async(client: PolicyClient, robot: Robot, chunks: int, chunk_size: int) -> Episode:
    episode = Episode()
    client.reset(PROMPT)
    executing = client.infer(robot.observation(), PROMPT)
    episode.starts.append(time.perf_counter())  # chunk 0 starts; chunk 1 is predicted meanwhile
    following = _timed(lambda: client.infer(robot.observation(), PROMPT), episode.latencies)
    for chunk in range(1, chunks):
        time.sleep(max(0.0, episode.starts[-1] + robot.seconds - time.perf_counter()))  # chunk-1 done
        episode.starts.append(time.perf_counter())
        finished, executing = executing, following  # the robot starts `chunk` at once
        if chunk == chunks - 1:
            break
        following = _timed(lambda f=finished, c=chunk: _feedback_and_infer(client, robot, f, c - 1, chunk_size),
                           episode.latencies)
    time.sleep(max(0.0, episode.starts[-1] + robot.seconds - time.perf_counter()))
    episode.end = time.perf_counter()
    return episode


def chunk_latency(runtime, robot: Robot, chunks: int, chunk_size: int, shortcuts: bool) -> float:
    """Steady-state seconds per synchronous chunk (feedback + infer) of the runtime, without a server."""
    runtime.sampler.shortcuts = shortcuts  # read when an episode starts and by each action loop
    runtime.reset(PROMPT)
    actions = runtime.infer(robot.observation())
    latencies: list[float] = []
    for chunk in range(chunks - 1):
        started = time.perf_counter()
        runtime.feedback(robot.keyframes(4 * (chunk_size - 1 if chunk == 0 else chunk_size)), actions)
        actions = runtime.infer()
        latencies.append(time.perf_counter() - started)
    return statistics.mean(latencies[len(latencies) // 2:])


def prediction_chunks_per_s(runtime, scheduling: SessionScheduling, sessions: int, chunks: int, chunk_size: int,
                            image_size: int) -> tuple[float, float]:
    """Chunks predicted per second, summed over `sessions` episodes of the runtime's model run side by
    side without robot time, each session in its own thread and each request in its turn under
    `scheduling`, as the server runs them. -> (chunks per second, forwards per model call: 1 unless
    batched)."""
    policies = [runtime.new_session(scheduling.batcher) for _ in range(sessions)]

    def request(call: Callable[[], object]) -> object:
        with scheduling.request():
            return call()

    def episode(index: int) -> None:
        policy, robot = policies[index], Robot(image_size, 0.0)
        request(lambda: policy.reset(PROMPT))
        actions = request(lambda: policy.infer(robot.observation()))
        for chunk in range(chunks - 1):
            keyframes = robot.keyframes(4 * (chunk_size - 1 if chunk == 0 else chunk_size))
            request(lambda k=keyframes, a=actions: policy.feedback(k, a))
            actions = request(policy.infer)

    started = time.perf_counter()
    with ThreadPoolExecutor(sessions) as pool:
        list(pool.map(episode, range(sessions)))
    elapsed = time.perf_counter() - started
    batcher = scheduling.batcher
    per_call = batcher.stats.forwards / batcher.stats.calls if batcher is not None else 1.0
    return sessions * chunks / elapsed, per_call


def sessions_actions_per_s(runtime, options: ServerOptions, robots: int, seconds: float, chunks: int,
                           chunk_size: int, image_size: int, actions: int) -> float:
    """Executed actions per second of robot time, summed over `robots` robots driving one server (of
    `options`) at once, each taking `seconds` per chunk (steady state, from chunk n/2 on)."""
    with BackgroundServer(runtime, options) as server:
        def one(_: int) -> float:
            with PolicyClient(f"ws://127.0.0.1:{server.port}") as client:
                episode = run_sync(client, Robot(image_size, seconds), chunks, chunk_size)
                return episode.steady_chunks_per_s(chunks // 2)

        with ThreadPoolExecutor(robots) as pool:
            return sum(pool.map(one, range(robots))) * actions


def run_median(runs: list[dict], figure: Callable[[dict], float]) -> float:
    """The median over repeats of one figure of each repeat's record."""
    return statistics.median(figure(r) for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo-mot")
    parser.add_argument("--image-size", type=int, default=128, help="pixels per side of each of the 2 cameras")
    parser.add_argument("--chunk-size", type=int, default=4)
    parser.add_argument("--actions-per-frame", type=int, default=8)
    parser.add_argument("--video-steps", type=int, default=5)
    parser.add_argument("--action-steps", type=int, default=10)
    parser.add_argument("--video-stop-sigma", type=float, default=0.0)
    parser.add_argument("--attention-window", type=int, default=30, help="cache holds window // 2 chunks")
    parser.add_argument("--chunks", type=int, default=24, help="chunks per episode (> window // 2 for a "
                        "steady state with a full cache in the second half)")
    parser.add_argument("--exec-fractions", default="1", help="robot time per chunk / P_sync, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="calibrations, each followed by one "
                        "sync/async episode pair per robot time")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--text-tokens", type=int, default=512, help="prompt length of the bundle")
    parser.add_argument("--sessions", type=int, default=4, help="robots on one server, against one alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = InferenceSettings(chunk_size=args.chunk_size, video_steps=args.video_steps,
                                 action_steps=args.action_steps, video_stop_sigma=args.video_stop_sigma,
                                 attention_window=args.attention_window)
    fractions = [float(f) for f in args.exec_fractions.split(",")]
    steady_from = args.chunks // 2

    with tempfile.TemporaryDirectory() as tmp:
        bundle = make_bundle(Path(tmp), args.preset, args.image_size, settings, args.actions_per_frame,
                             args.text_tokens)
        runtime = load_bundle(bundle).runtime()
        chunk_runs: list[dict] = []
        session_runs: list[dict] = []
        prediction_runs: list[dict] = []
        parallel = cpu_parallel_requests()
        schedulings = {"one_at_a_time": lambda: SessionScheduling(1),
                       "parallel": lambda: SessionScheduling(parallel),
                       "batched": lambda: SessionScheduling(batcher=ForwardBatcher(max_wait_s=0.05))}
        served = {"one_at_a_time": ServerOptions(port=0, max_sessions=args.sessions, batch_sessions=False,
                                                 parallel_requests=1),
                  "default": ServerOptions(port=0, max_sessions=args.sessions)}
        default_scheduling = PolicyServer(runtime, served["default"]).scheduling.describe()
        options = ServerOptions(port=0, max_sessions=args.sessions + 1)  # + the calibrating client
        with BackgroundServer(runtime, options) as server, \
                PolicyClient(f"ws://127.0.0.1:{server.port}") as client:
            run_sync(client, Robot(args.image_size, 0.0), 3, args.chunk_size)  # warm-up
            runs: dict[str, list[dict]] = {}
            for _ in range(args.repeats):
                local = runtime.new_session()
                chunk_runs.append({
                    name: chunk_latency(local, Robot(args.image_size, 0.0), args.chunks, args.chunk_size, shortcuts)
                    for name, shortcuts in (("full", False), ("shortcuts", True))})
                del local
                prediction_runs.append({
                    name: prediction_chunks_per_s(runtime, make(), args.sessions, args.chunks, args.chunk_size,
                                                  args.image_size)
                    for name, make in schedulings.items()})
                one_p = run_sync(client, Robot(args.image_size, 0.0), args.chunks, args.chunk_size).steady_latency()

                def actions_per_s(options: ServerOptions, robots: int, one_p=one_p) -> float:
                    return sessions_actions_per_s(runtime, options, robots, one_p, args.chunks, args.chunk_size,
                                                  args.image_size, args.chunk_size * args.actions_per_frame)

                session_runs.append({"exec": one_p, "one": actions_per_s(served["default"], 1),
                                     **{name: actions_per_s(options, args.sessions) for name, options in served.items()}})
                p_sync = run_sync(client, Robot(args.image_size, 0.0), args.chunks, args.chunk_size).steady_latency()
                p_async = run_async(client, Robot(args.image_size, 0.0), args.chunks, args.chunk_size).steady_latency()
                points = [(f"{f:g} x P_sync", f * p_sync) for f in fractions] + [("P_async", p_async)]
                for label, seconds in points:
                    robot = Robot(args.image_size, seconds)
                    sync = run_sync(client, robot, args.chunks, args.chunk_size)
                    asyn = run_async(client, robot, args.chunks, args.chunk_size)
                    runs.setdefault(label, []).append({
                        "p_sync": p_sync, "p_async": p_async, "exec": seconds,
                        "sync_steady": sync.steady_chunks_per_s(steady_from),
                        "async_steady": asyn.steady_chunks_per_s(steady_from),
                        "sync_episode": sync.chunks_per_s(), "async_episode": asyn.chunks_per_s(),
                        "sync_run_latency": sync.steady_latency(), "async_run_latency": asyn.steady_latency()})

    actions = args.chunk_size * args.actions_per_frame
    print(f"preset {args.preset}, {args.threads} threads, 2 cameras {args.image_size}px, K={args.chunk_size}, "
          f"N={args.actions_per_frame} ({actions} actions/chunk), video {args.video_steps} steps "
          f"(stop sigma {args.video_stop_sigma}), actions {args.action_steps} steps, CFG 5/1, "
          f"window {args.attention_window}, {args.chunks} chunks, steady state from chunk {steady_from}, "
          f"{args.repeats} repeats")
    rows = []
    for label, items in runs.items():
        def median(key, items=items):
            return statistics.median(item[key] for item in items)

        rows.append({
            "robot_time": label, "exec_ms": median("exec") * 1e3,
            "p_sync_ms": median("p_sync") * 1e3, "p_async_ms": median("p_async") * 1e3,
            "run_p_sync_ms": median("sync_run_latency") * 1e3, "run_p_async_ms": median("async_run_latency") * 1e3,
            "sync_actions_per_s": median("sync_steady") * actions, "async_actions_per_s": median("async_steady") * actions,
            "steady_ratio": statistics.median(i["async_steady"] / i["sync_steady"] for i in items),
            "episode_ratio": statistics.median(i["async_episode"] / i["sync_episode"] for i in items),
            "bound_ratio": statistics.median((i["exec"] + i["p_sync"]) / max(i["exec"], i["p_async"]) for i in items),
        })
    header = ("robot time E", "E ms", "P_sync ms", "P_async ms", "run P_sync", "run P_async", "sync act/s",
              "async act/s", "async/sync", "bound", "episode")
    print(" | ".join(f"{h:>11}" for h in header))
    for r in rows:
        values = (r["robot_time"], f"{r['exec_ms']:.0f}", f"{r['p_sync_ms']:.0f}", f"{r['p_async_ms']:.0f}",
                  f"{r['run_p_sync_ms']:.0f}", f"{r['run_p_async_ms']:.0f}",
                  f"{r['sync_actions_per_s']:.1f}", f"{r['async_actions_per_s']:.1f}", f"{r['steady_ratio']:.2f}x",
                  f"{r['bound_ratio']:.2f}x", f"{r['episode_ratio']:.2f}x")
        print(" | ".join(f"{v:>11}" for v in values))
    print("P_sync, P_async: calibrated steady-state prediction ms per chunk (no execution time); run P_*: the "
          "same inside the timed episodes; async/sync: measured steady-state ratio; bound: (E + P_sync) / "
          f"max(E, P_async) from the calibration; episode: whole {args.chunks}-chunk episodes")
    chunk = {"text_tokens": args.text_tokens,
             "full_ms": run_median(chunk_runs, lambda r: r["full"]) * 1e3,
             "shortcuts_ms": run_median(chunk_runs, lambda r: r["shortcuts"]) * 1e3,
             "speedup": run_median(chunk_runs, lambda r: r["full"] / r["shortcuts"])}
    sessions = {"sessions": args.sessions, "scheduling": default_scheduling,
                "exec_ms": run_median(session_runs, lambda r: r["exec"]) * 1e3,
                "one_actions_per_s": run_median(session_runs, lambda r: r["one"]),
                "many_actions_per_s": run_median(session_runs, lambda r: r["default"]),
                "ratio": run_median(session_runs, lambda r: r["default"] / r["one"]),
                "one_at_a_time_actions_per_s": run_median(session_runs, lambda r: r["one_at_a_time"]),
                "one_at_a_time_ratio": run_median(session_runs, lambda r: r["one_at_a_time"] / r["one"])}
    prediction = {"sessions": args.sessions, "parallel": parallel,
                  **{f"{name}_chunks_per_s": run_median(prediction_runs, lambda r, n=name: r[n][0])
                     for name in schedulings},
                  "forwards_per_call": run_median(prediction_runs, lambda r: r["batched"][1]),
                  **{f"{name}_ratio": run_median(prediction_runs, lambda r, n=name: r[n][0] / r["one_at_a_time"][0])
                     for name in ("parallel", "batched")}}
    print(f"chunk ({args.text_tokens} text tokens, sync, runtime alone): full forwards {chunk['full_ms']:.0f} ms, "
          f"with the shortcuts {chunk['shortcuts_ms']:.0f} ms: {chunk['speedup']:.2f}x")
    print(f"sessions (robot time E = P_sync of one robot, {sessions['exec_ms']:.0f} ms): 1 robot "
          f"{sessions['one_actions_per_s']:.1f} actions/s; {args.sessions} robots on one server, its default "
          f"({default_scheduling}), {sessions['many_actions_per_s']:.1f} actions/s: {sessions['ratio']:.2f}x; "
          f"one request at a time {sessions['one_at_a_time_actions_per_s']:.1f} actions/s: "
          f"{sessions['one_at_a_time_ratio']:.2f}x")
    print(f"prediction ({args.sessions} sessions predicting at once, no robot time, chunks/s): one request at a "
          f"time {prediction['one_at_a_time_chunks_per_s']:.2f}; {parallel} at once "
          f"{prediction['parallel_chunks_per_s']:.2f} ({prediction['parallel_ratio']:.2f}x); batched "
          f"{prediction['batched_chunks_per_s']:.2f} ({prediction['batched_ratio']:.2f}x, "
          f"{prediction['forwards_per_call']:.2f} forwards per model call)")
    print(json.dumps({"async": rows, "chunk": chunk, "sessions": sessions, "prediction": prediction}))


if __name__ == "__main__":
    main()

"""A procedural 2-D pushing world whose video is caused by its actions, and a LeRobot v2.1 writer.

The world is the unit square [0, 1]^2 (x to the right, y downwards, so "top" is small y), rendered
into a square RGB image. A dark disc (the agent) moves by a velocity command (dx, dy) in arena units
per step; one to three coloured squares (blocks) are pushed kinematically when the agent runs into
them. A scripted, noisy policy pushes one block towards one side of the arena and names the task in
text ("push the red block to the left"). `generate_demo_dataset` writes episodes of it as a LeRobot
v2.1 dataset (parquet + mp4 + meta), the same layout real robot datasets use, so the demo exercises
the real data path end to end.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lbva.errors import UserError

AGENT_RADIUS = 0.07
BLOCK_HALF = 0.07  # half the side of a block
MAX_SPEED = 0.04  # arena units per step; at 128 px that is ~5 px per frame
PUSH_SPEED = 0.75 * MAX_SPEED
ACTION_NOISE = 0.2 * MAX_SPEED  # std of the Gaussian noise added to every command

FLOOR_RGB = (225, 218, 200)
AGENT_RGB = (35, 35, 40)
BLOCK_RGB = {"red": (215, 45, 45), "green": (40, 160, 70), "blue": (45, 85, 215)}
GOAL_DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "top": (0.0, -1.0), "bottom": (0.0, 1.0)}

CAMERA_KEY = "observation.images.top"
CHUNKS_SIZE = 1000
DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"


def _box_distance(px: float, py: float, half: float) -> float:
    """Signed distance from point (px, py) to the origin-centred square of half-side `half`."""
    qx, qy = abs(px) - half, abs(py) - half
    outside = math.hypot(max(qx, 0.0), max(qy, 0.0))
    return outside + min(max(qx, qy), 0.0)


def _exit_distance(rel: tuple[float, float], u: tuple[float, float], half: float, radius: float) -> float:
    """Smallest s >= 0 such that rel + s*u is at least `radius` away from the square of half `half`.

    The distance along a line to a convex set is convex, so the overlapping part of the ray is one
    interval starting at s = 0 and bisection finds its end.
    """
    if _box_distance(rel[0], rel[1], half) >= radius:
        return 0.0
    lo, hi = 0.0, math.hypot(*rel) + 2.0 * (half + radius)
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        if _box_distance(rel[0] + mid * u[0], rel[1] + mid * u[1], half) >= radius:
            hi = mid
        else:
            lo = mid
    return hi


def _clip(value: float, margin: float) -> float:
    """Clamp an arena coordinate so a shape reaching `margin` from its centre stays inside."""
    return min(max(value, margin), 1.0 - margin)


class PushWorld:
    """The arena state (agent and block centres in arena units) with `step` and `render`."""

    def __init__(self, agent: Sequence[float], blocks: Sequence[Sequence[float]], block_colors: Sequence[str],
                 image_size: int = 128) -> None:
        self.agent = [float(agent[0]), float(agent[1])]
        self.blocks = [[float(b[0]), float(b[1])] for b in blocks]
        self.block_colors = list(block_colors)
        self.image_size = image_size
        self._floor = np.full((image_size, image_size, 3), FLOOR_RGB, np.float32)

    def step(self, command: Sequence[float]) -> np.ndarray:
        """Apply one velocity command; returns it as applied (clipped to MAX_SPEED), float32 [2].

        The agent stays inside the arena. A block it overlaps is pushed out along the agent's motion;
        walls and other blocks stop a pushed block, and then the agent stops against it.
        """
        dx, dy = float(command[0]), float(command[1])
        speed = math.hypot(dx, dy)
        if speed > MAX_SPEED:
            dx, dy = dx * MAX_SPEED / speed, dy * MAX_SPEED / speed
        old = self.agent
        self.agent = [_clip(old[0] + dx, AGENT_RADIUS), _clip(old[1] + dy, AGENT_RADIUS)]
        move = math.hypot(self.agent[0] - old[0], self.agent[1] - old[1])
        if move > 0.0:
            u = ((self.agent[0] - old[0]) / move, (self.agent[1] - old[1]) / move)
            for i in range(len(self.blocks)):
                self._push_block(i, u)
        return np.array([dx, dy], np.float32)

    def _push_block(self, i: int, u: tuple[float, float]) -> None:
        """Resolve an overlap between the agent and block i, the agent having moved along unit u."""
        back = (-u[0], -u[1])
        block = self.blocks[i]
        # Pushing the block by s*u moves the agent, relative to the block, by -s*u.
        s = _exit_distance((self.agent[0] - block[0], self.agent[1] - block[1]), back, BLOCK_HALF, AGENT_RADIUS)
        if s == 0.0:
            return
        self._shove(i, s, u, chain={i})
        # Where a wall or another block held the block back, the agent stops at its face instead.
        t = _exit_distance((self.agent[0] - block[0], self.agent[1] - block[1]), back, BLOCK_HALF, AGENT_RADIUS)
        self.agent = [_clip(self.agent[0] - t * u[0], AGENT_RADIUS), _clip(self.agent[1] - t * u[1], AGENT_RADIUS)]

    def _shove(self, i: int, s: float, u: tuple[float, float], chain: set[int]) -> None:
        """Move block i by s along u, pushing the blocks ahead of it; walls stop the whole row.

        `chain` holds the blocks already pushing, so a block that ends up behind another (because a
        wall held the front one back) is not shoved through it.
        """
        block = self.blocks[i]
        block[0] = _clip(block[0] + s * u[0], BLOCK_HALF)
        block[1] = _clip(block[1] + s * u[1], BLOCK_HALF)
        for j, other in enumerate(self.blocks):
            if j in chain:
                continue
            # Two squares of half h overlap exactly when one centre lies in the square of half 2h.
            t = _exit_distance((other[0] - block[0], other[1] - block[1]), u, 2.0 * BLOCK_HALF, 0.0)
            if t > 0.0:
                self._shove(j, t, u, chain | {j})
                back = _exit_distance((block[0] - other[0], block[1] - other[1]), (-u[0], -u[1]),
                                      2.0 * BLOCK_HALF, 0.0)
                block[0] -= back * u[0]
                block[1] -= back * u[1]

    def render(self) -> np.ndarray:
        """The current frame, uint8 [S, S, 3], with anti-aliased shape edges."""
        img = self._floor.copy()
        scale = float(self.image_size)
        for (bx, by), color in zip(self.blocks, self.block_colors):
            self._paint(img, bx * scale, by * scale, BLOCK_HALF * scale, BLOCK_RGB[color], square=True)
        self._paint(img, self.agent[0] * scale, self.agent[1] * scale, AGENT_RADIUS * scale, AGENT_RGB, square=False)
        return np.rint(img).astype(np.uint8)

    def _paint(self, img: np.ndarray, cx: float, cy: float, size: float, rgb: tuple[int, int, int],
               square: bool) -> None:
        # Only the shape's bounding box is touched, which keeps rendering cheap.
        n = img.shape[0]
        x0, x1 = max(int(cx - size) - 1, 0), min(int(cx + size) + 2, n)
        y0, y1 = max(int(cy - size) - 1, 0), min(int(cy + size) + 2, n)
        if x0 >= x1 or y0 >= y1:
            return
        xs = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
        ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
        if square:
            dist = np.maximum(np.abs(xs), np.abs(ys)) - size
        else:
            dist = np.sqrt(xs * xs + ys * ys) - size
        cover = np.clip(0.5 - dist, 0.0, 1.0)[..., None]  # one-pixel soft edge
        patch = img[y0:y1, x0:x1]
        patch += cover * (np.asarray(rgb, np.float32) - patch)


class ScriptedPusher:
    """A noisy scripted policy: get behind block `target` (opposite the goal side), then push it there.

    The policy is memoryless: each step it reads the geometry and picks a waypoint, so noise or a
    collision never leaves it in a stale phase.
    """

    def __init__(self, target: int, goal: str, rng: np.random.Generator) -> None:
        self.target = target
        self.goal = goal
        self.rng = rng
        self.speed = float(rng.uniform(0.6, 1.0)) * MAX_SPEED  # per-episode operator speed

    def act(self, world: PushWorld) -> np.ndarray:
        """The next velocity command, float [2], noise included."""
        gx, gy = GOAL_DIRECTIONS[self.goal]
        px, py = -gy, gx  # the lateral axis
        bx, by = world.blocks[self.target]
        ax, ay = world.agent
        along = (ax - bx) * gx + (ay - by) * gy
        lateral = (ax - bx) * px + (ay - by) * py
        contact = BLOCK_HALF + AGENT_RADIUS
        clearance = contact + 0.04
        side = 1.0 if lateral >= 0.0 else -1.0
        if self._block_at_goal(bx, by):
            command = np.zeros(2)
        elif along <= -contact + 0.01 and abs(lateral) < 0.03:
            # Pushing: drive along the goal direction, steering back onto the block's centre line.
            command = np.array([gx, gy]) * PUSH_SPEED - np.array([px, py]) * 0.5 * lateral
        else:
            if along <= -contact:  # behind the block: line up with it
                wx, wy = bx - gx * (contact + 0.005), by - gy * (contact + 0.005)
            elif abs(lateral) >= contact:  # beside it: go round the corner to its back
                wx, wy = bx - gx * clearance + px * side * clearance, by - gy * clearance + py * side * clearance
            else:  # in front of it: step sideways first so the approach does not push it backwards
                wx, wy = ax + px * side * (clearance - abs(lateral)), ay + py * side * (clearance - abs(lateral))
            command = 0.5 * np.array([_clip(wx, AGENT_RADIUS) - ax, _clip(wy, AGENT_RADIUS) - ay])
        norm = float(np.hypot(*command))
        if norm > self.speed:
            command *= self.speed / norm
        return command + self.rng.normal(0.0, ACTION_NOISE, 2)

    def _block_at_goal(self, bx: float, by: float) -> bool:
        gap = {"left": bx, "right": 1.0 - bx, "top": by, "bottom": 1.0 - by}[self.goal] - BLOCK_HALF
        return gap < 0.08


@dataclass
class DemoEpisode:
    """One rollout. Row t of `actions` is the command applied between frame t and frame t+1."""

    frames: np.ndarray  # [T, S, S, 3] uint8
    states: np.ndarray  # [T, 2] float32, agent centre (x, y) in arena units
    actions: np.ndarray  # [T, 2] float32, applied velocity commands (dx, dy)
    task: str
    blocks: np.ndarray  # [T, B, 2] float32, block centres (for analysis and tests)
    block_colors: list[str]


def simulate_episode(rng: np.random.Generator, num_frames: int, image_size: int = 128) -> DemoEpisode:
    """Lay out a random arena, pick a block and goal side, and roll the scripted policy for num_frames."""
    colors = [str(c) for c in rng.choice(list(BLOCK_RGB), size=int(rng.integers(1, 4)), replace=False)]
    blocks: list[np.ndarray] = []
    while len(blocks) < len(colors):
        # Blocks start in the middle so every goal side leaves room to get behind them.
        c = rng.uniform(0.25, 0.75, 2)
        if all(np.max(np.abs(c - b)) >= 2 * BLOCK_HALF + 0.04 for b in blocks):
            blocks.append(c)
    while True:
        agent = rng.uniform(AGENT_RADIUS, 1.0 - AGENT_RADIUS, 2)
        if all(_box_distance(*(agent - b), BLOCK_HALF) >= AGENT_RADIUS + 0.03 for b in blocks):
            break
    target = int(rng.integers(len(colors)))
    goal = str(rng.choice(list(GOAL_DIRECTIONS)))
    world = PushWorld(agent, blocks, colors, image_size)
    policy = ScriptedPusher(target, goal, rng)

    frames = np.empty((num_frames, image_size, image_size, 3), np.uint8)
    states = np.empty((num_frames, 2), np.float32)
    actions = np.empty((num_frames, 2), np.float32)
    block_track = np.empty((num_frames, len(colors), 2), np.float32)
    for t in range(num_frames):
        frames[t] = world.render()
        states[t] = world.agent
        block_track[t] = world.blocks
        actions[t] = world.step(policy.act(world))
    task = f"push the {colors[target]} block to the {goal}"
    return DemoEpisode(frames, states, actions, task, block_track, colors)


def _video_codec() -> str:
    """libx264 where this PyAV build has it, else the always-present mpeg4 encoder."""
    try:
        av.codec.Codec("libx264", "w")
    except av.error.FFmpegError:
        return "mpeg4"
    return "libx264"


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    """Encode uint8 frames [T, H, W, 3] (H, W even) as a yuv420p mp4 of near-lossless quality."""
    codec = _video_codec()
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        # High quality because training compares decoded frames with what the world rendered.
        options = {"crf": "16"} if codec == "libx264" else {}
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "mpeg4":
            stream.bit_rate = 8_000_000
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def _list_column(values: np.ndarray) -> pa.ListArray:
    """[T, D] float32 -> list<float32> column, the type LeRobot uses for vector features."""
    t, d = values.shape
    offsets = pa.array(np.arange(0, (t + 1) * d, d, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1).astype(np.float32)))


def _stats(values: np.ndarray) -> dict[str, list]:
    """LeRobot v2.1 per-episode statistics of a [T, D] array."""
    return {
        "min": values.min(0).tolist(), "max": values.max(0).tolist(),
        "mean": values.mean(0).tolist(), "std": values.std(0).tolist(), "count": [len(values)],
    }


class LeRobotWriter:
    """Writes DemoEpisodes into a new LeRobot v2.1 dataset folder; call `finish` to write meta/info.json."""

    def __init__(self, root: Path, *, fps: int, image_size: int) -> None:
        if root.exists() and any(root.iterdir()):
            raise UserError(f"{root} is not empty; choose a new folder for the demo dataset")
        (root / "meta").mkdir(parents=True, exist_ok=True)
        self.root, self.fps, self.image_size = root, fps, image_size
        self.tasks: dict[str, int] = {}
        self.num_episodes = 0
        self.num_frames = 0

    def add_episode(self, episode: DemoEpisode) -> None:
        """Write one episode's parquet, mp4 and meta lines."""
        t = len(episode.actions)
        if episode.frames.shape != (t, self.image_size, self.image_size, 3) or episode.states.shape != (t, 2) \
                or episode.actions.shape != (t, 2):
            raise ValueError(f"episode shapes do not match {self.image_size}px frames and [{t}, 2] state/action")
        index = self.num_episodes
        task_index = self.tasks.setdefault(episode.task, len(self.tasks))
        chunk = index // CHUNKS_SIZE
        arrays = {
            "observation.state": episode.states,
            "action": episode.actions,
            "timestamp": np.arange(t, dtype=np.float32) / np.float32(self.fps),
            "frame_index": np.arange(t, dtype=np.int64),
            "episode_index": np.full(t, index, np.int64),
            "index": np.arange(self.num_frames, self.num_frames + t, dtype=np.int64),
            "task_index": np.full(t, task_index, np.int64),
        }
        columns = {name: _list_column(a) if a.ndim == 2 else pa.array(a) for name, a in arrays.items()}
        data_path = self.root / DATA_PATH.format(episode_chunk=chunk, episode_index=index)
        data_path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(columns), data_path)
        write_mp4(self.root / VIDEO_PATH.format(episode_chunk=chunk, video_key=CAMERA_KEY, episode_index=index),
                  episode.frames, self.fps)

        stats = {name: _stats(a.reshape(t, -1).astype(np.float64)) for name, a in arrays.items()}
        # Image stats are per channel in [0, 1] with shape [3, 1, 1], as LeRobot stores them.
        pixel_stats = _stats(episode.frames.reshape(-1, 3).astype(np.float32) / 255.0)
        stats[CAMERA_KEY] = {k: v if k == "count" else [[[x]] for x in v] for k, v in pixel_stats.items()}
        self._append_jsonl("episodes.jsonl", {"episode_index": index, "tasks": [episode.task], "length": t})
        self._append_jsonl("episodes_stats.jsonl", {"episode_index": index, "stats": stats})
        self.num_episodes += 1
        self.num_frames += t

    def finish(self) -> Path:
        """Write tasks.jsonl and info.json; returns the dataset root."""
        with open(self.root / "meta" / "tasks.jsonl", "w") as f:
            for task, task_index in self.tasks.items():
                f.write(json.dumps({"task_index": task_index, "task": task}) + "\n")
        scalar = {"shape": [1], "names": None}
        info = {
            "codebase_version": "v2.1",
            "robot_type": "demo_pusher",
            "total_episodes": self.num_episodes,
            "total_frames": self.num_frames,
            "total_tasks": len(self.tasks),
            "total_videos": self.num_episodes,
            "total_chunks": (self.num_episodes - 1) // CHUNKS_SIZE + 1,
            "chunks_size": CHUNKS_SIZE,
            "fps": self.fps,
            "splits": {"train": f"0:{self.num_episodes}"},
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH,
            "features": {
                CAMERA_KEY: {
                    "dtype": "video",
                    "shape": [self.image_size, self.image_size, 3],
                    "names": ["height", "width", "channels"],
                    "info": {
                        "video.height": self.image_size, "video.width": self.image_size,
                        "video.codec": "h264" if _video_codec() == "libx264" else "mpeg4",
                        "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": self.fps,
                        "video.channels": 3, "has_audio": False,
                    },
                },
                "observation.state": {"dtype": "float32", "shape": [2], "names": ["x", "y"]},
                "action": {"dtype": "float32", "shape": [2], "names": ["dx", "dy"]},
                "timestamp": {"dtype": "float32", **scalar},
                "frame_index": {"dtype": "int64", **scalar},
                "episode_index": {"dtype": "int64", **scalar},
                "index": {"dtype": "int64", **scalar},
                "task_index": {"dtype": "int64", **scalar},
            },
        }
        (self.root / "meta" / "info.json").write_text(json.dumps(info, indent=4) + "\n")
        return self.root

    def _append_jsonl(self, name: str, record: dict) -> None:
        with open(self.root / "meta" / name, "a") as f:
            f.write(json.dumps(record) + "\n")


def generate_demo_dataset(out_dir: Path, *, num_episodes: int, frames_per_episode: int, fps: int = 20,
                          image_size: int = 128, seed: int = 0) -> Path:
    """Simulate `num_episodes` scripted pushing episodes and write them as a LeRobot v2.1 dataset.

    Episode i depends only on (seed, i), so a larger dataset with the same seed extends a smaller one.
    Returns `out_dir`, which must be new or empty.
    """
    if num_episodes < 1 or frames_per_episode < 2 or fps < 1:
        raise UserError(f"demo dataset needs num_episodes >= 1, frames_per_episode >= 2 and fps >= 1, got "
                        f"{num_episodes}, {frames_per_episode}, {fps}")
    if image_size < 32 or image_size % 2:
        raise UserError(f"demo image_size must be even and >= 32 (yuv420p video), got {image_size}")
    writer = LeRobotWriter(Path(out_dir), fps=fps, image_size=image_size)
    for index in range(num_episodes):
        writer.add_episode(simulate_episode(np.random.default_rng([seed, index]), frames_per_episode, image_size))
    return writer.finish()

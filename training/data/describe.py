"""`lbva data describe SRC`: what a LeRobot folder holds, read from its metadata alone (no video is
decoded), and the `lbva data prepare` command that fits it.

The suggested command spells out what prepare would otherwise choose by itself (the camera sizes,
the target fps) and maps each action dim to a slot of the 30-d layout by name (action_slots.py),
so a newcomer sees every choice and can change it.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from lbva.training.data.action_slots import suggest_slots
from lbva.training.data.lerobot import LeRobotDataset

# Words as the tiny umT5's tokenizer splits them (tokenizers' Whitespace pre-tokenizer): runs of
# word characters, and runs of other non-space characters.
_WORD = re.compile(r"\w+|[^\w\s]+")


def prompt_words(texts: list[str]) -> list[str]:
    """The distinct words of the texts, sorted: the vocabulary a text encoder needs for them."""
    return sorted({word for text in texts for word in _WORD.findall(text)})


def suggested_prepare_command(dataset: LeRobotDataset, src: Path, sizes: list[tuple[int, int]],
                              target_fps: int) -> str:
    """The `lbva data prepare` command for the dataset with every default written out; OUT and the
    encoder folders are placeholders, an action dim without a guessed slot is left as NAME=?."""
    args = ["lbva", "data", "prepare", str(src), "OUT", "--target-fps", str(target_fps)]
    if sizes:
        heights = sorted({h for h, _ in sizes})
        args += ["--height", ",".join(map(str, heights)), "--width", ",".join(str(w) for _, w in sizes)]
    if dataset.has_actions:
        names = dataset.feature_names("action")
        slots = suggest_slots(names)
        args += ["--action-map", ",".join(f"{name}={slot or '?'}" for name, slot in zip(names, slots))]
    args += ["--encoders", "real", "--vae", "VAE_DIR", "--text-encoder", "TEXT_DIR"]
    return shlex.join(args)


def describe(src: Path) -> str:
    """The description `lbva data describe` prints, ending with the suggested prepare command."""
    from lbva.training.data.prepare import default_camera_sizes, default_target_fps

    dataset = LeRobotDataset(src)
    lines = [f"{src}: LeRobot {dataset.version}, {dataset.fps} fps, {dataset.num_episodes} episodes"]
    lengths = [dataset.episode_length(e) for e in dataset.episode_indices]
    if lengths:
        lines.append(f"  episodes: {min(lengths)} to {max(lengths)} frames, {sum(lengths)} in all "
                     f"(numbers {dataset.episode_indices[0]}..{dataset.episode_indices[-1]})")
    lines.append(f"  cameras ({len(dataset.camera_keys)}):")
    for key in dataset.camera_keys:
        h, w = dataset.camera_size(key)
        lines.append(f"    {key}: {w}x{h} px at {dataset.fps} fps")
    for key, label in (("action", "actions"), ("observation.state", "state")):
        names = dataset.feature_names(key)
        lines.append(f"  {label} ({len(names)} dims): {', '.join(names) if names else 'none'}")
    texts = dataset.texts()
    lines.append(f"  tasks ({len(texts)}):")
    lines += [f"    {text}" for text in texts]
    words = prompt_words(texts)
    lines.append(f"  prompt words ({len(words)}): {' '.join(words)}")
    sizes = default_camera_sizes(dataset, dataset.camera_keys, "side_by_side") if dataset.camera_keys else []
    lines.append("suggested (check the action slots against `lbva data prepare --help`):")
    lines.append("  " + suggested_prepare_command(dataset, src, sizes, default_target_fps(dataset.fps)))
    return "\n".join(lines)

"""Names for the 30 slots of the unified action layout (models/action_space.py, spec 2.1), so that a
dataset's action dims can be mapped by name (`--action-map x=left_x,grip=left_gripper`) and a newcomer
reads which slot means what in one table (`slot_table`, printed by `lbva data prepare --help` and
kept in docs/data.md).

Layout: [0:7] left end effector (x, y, z, quaternion x y z w), [7:14] the right one, [14:21] left
arm joints, [21:28] right arm joints, [28] left gripper, [29] right gripper. A one-armed robot uses
the left slots.
"""

from __future__ import annotations

import re

from lbva.errors import UserError
from lbva.models.action_space import ACTION_DIM

_EEF = ("x", "y", "z", "qx", "qy", "qz", "qw")
SLOT_NAMES: tuple[str, ...] = (
    *(f"left_{axis}" for axis in _EEF), *(f"right_{axis}" for axis in _EEF),
    *(f"left_joint_{i}" for i in range(7)), *(f"right_joint_{i}" for i in range(7)),
    "left_gripper", "right_gripper",
)
assert len(SLOT_NAMES) == ACTION_DIM

_GROUPS = (  # (slots, what they hold) for the table
    ((0, 7), "left end effector: x, y, z, then orientation quaternion qx, qy, qz, qw"),
    ((7, 14), "right end effector: the same seven"),
    ((14, 21), "left arm joints 0..6"),
    ((21, 28), "right arm joints 0..6"),
    ((28, 29), "left gripper"),
    ((29, 30), "right gripper"),
)


def slot_table() -> str:
    """The layout as a markdown table: slots, their names, what they hold."""
    rows = ["| slots | names | holds |", "|---|---|---|"]
    for (first, end), holds in _GROUPS:
        slots = str(first) if end - first == 1 else f"{first}-{end - 1}"
        names = SLOT_NAMES[first] if end - first == 1 else f"{SLOT_NAMES[first]} .. {SLOT_NAMES[end - 1]}"
        rows.append(f"| {slots} | {names} | {holds} |")
    return "\n".join(rows)


def slot_of(text: str) -> int:
    """A slot given by number ("28") or name ("left_gripper")."""
    if text.isdigit():
        return int(text)
    if text in SLOT_NAMES:
        return SLOT_NAMES.index(text)
    raise UserError(f"--action-map: '{text}' is neither a slot number 0..{ACTION_DIM - 1} nor a slot name "
                    f"({SLOT_NAMES[0]}, ..., {SLOT_NAMES[-1]}; see `lbva data prepare --help`)")


def channels_from_map(text: str, action_names: list[str]) -> list[int]:
    """`--action-map name=slot,...` -> the slot of each action dim, in the dataset's order. Every dim
    is named once; names are the dataset's (info.json features.action.names)."""
    mapping: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        name, sep, slot = item.rpartition("=")
        if not sep or not name:
            raise UserError(f"--action-map: '{item}' is not NAME=SLOT")
        if name in mapping:
            raise UserError(f"--action-map names '{name}' twice")
        mapping[name] = slot_of(slot.strip())
    unknown = [name for name in mapping if name not in action_names]
    missing = [name for name in action_names if name not in mapping]
    if unknown or missing:
        raise UserError(f"--action-map must name each action dim of the dataset once ({', '.join(action_names)}); "
                        + "; ".join(filter(None, [unknown and f"not dims: {', '.join(unknown)}",
                                                  missing and f"missing: {', '.join(missing)}"])))
    return [mapping[name] for name in action_names]


def suggest_slots(action_names: list[str]) -> list[str | None]:
    """A guess at each dim's slot name from its own name (None where there is no good guess):
    arm side from left/right (left by default), then gripper, joint N, or an end-effector axis."""
    suggested: list[str | None] = []
    for name in action_names:
        words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
        side = "right" if {"right", "r"} & set(words) else "left"
        joint = re.search(r"joint_?(\d+)", name.lower())
        if any(w.startswith("grip") for w in words):
            guess = f"{side}_gripper"
        elif joint and int(joint.group(1)) < 7:
            guess = f"{side}_joint_{joint.group(1)}"
        else:
            axis = next((w[1:] if len(w) > 1 and w[0] == "d" and w[1:] in _EEF else w
                         for w in reversed(words) if w in _EEF or (w[:1] == "d" and w[1:] in _EEF)), None)
            guess = f"{side}_{axis}" if axis else None
        suggested.append(guess if guess not in suggested else None)
    return suggested

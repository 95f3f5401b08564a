"""Prepare on a full disk: one line naming the path that filled, and nothing partial left behind.
The disk is a real one: a 256 KiB tmpfs mounted for the test (root only; skipped, saying so, elsewhere)."""

import subprocess

import pytest

from lbva.errors import UserError
from lbva.models.encoders import EncoderChoice
from lbva.training.data.demo_world import generate_demo_dataset
from lbva.training.data.prepare import PrepareConfig, prepare


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)  # lazily: a pool worker may still hold it


def test_a_full_disk_stops_prepare_in_one_line_and_leaves_nothing_partial(tmp_path, small_disk):
    lerobot = generate_demo_dataset(tmp_path / "lerobot", num_episodes=6, frames_per_episode=81, image_size=128,
                                    seed=4)
    out = small_disk / "prepared"
    config = PrepareConfig(src=lerobot, out=out, action_channels=[0, 1], heights=[128], widths=[128],
                           shard_samples=1, encoders=EncoderChoice("standin", standin_text_dim=32))
    with pytest.raises(UserError, match=r"no space left on its file system .*nothing partial was kept"):
        prepare(config)
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers
    # What is there is whole: every visible shard has its index lines (or is repaired from its tar on rerun).
    assert all(p.stat().st_size > 0 for p in out.rglob("*.tar"))

"""Restarts: finished shards are skipped untouched, and an interrupted shard never becomes visible."""

import os
import subprocess
import sys
import textwrap

import pytest

from lbva.training.data.episode_encoder import EpisodeEncoder

# Episodes 0 and 1 (1 + 2 samples) fill shard 0, episodes 2 and 3 shard 1: shards close at episode boundaries.
SHARDS = ["t000-00000.tar", "t000-00001.tar"]


def shard_files(out):
    return sorted(p.name for p in (out / "shards" / "demo").iterdir())


@pytest.fixture(scope="module")
def reference(v21_dataset, tmp_path_factory, run_standin, shards_of, index_of):
    """An uninterrupted run: its samples (raw member bytes compared through decode) and index."""
    out = tmp_path_factory.mktemp("reference")
    run_standin(v21_dataset, out)
    return shards_of(out, "demo"), index_of(out, "demo")


def assert_same_samples(got, expected):
    assert sorted(got) == sorted(expected)
    for key, (latents, actions, mask, meta) in expected.items():
        assert (got[key][0] == latents).all() and (got[key][1] == actions).all() and got[key][3] == meta


def test_rerun_skips_finished_shards_without_touching_them(v21_dataset, tmp_path, run_standin):
    run_standin(v21_dataset, tmp_path)
    before = {name: os.stat(tmp_path / "shards" / "demo" / name) for name in SHARDS}
    report = run_standin(v21_dataset, tmp_path)
    assert (report.shards_skipped, report.shards_written, report.samples_written) == (2, 0, 0)
    for name, stat in before.items():
        after = os.stat(tmp_path / "shards" / "demo" / name)
        assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)


def test_crash_mid_shard_leaves_no_visible_partial_shard(v21_dataset, tmp_path, run_standin, monkeypatch,
                                                         shards_of, index_of, reference):
    original = EpisodeEncoder.encode
    calls = []

    def crash_on_third_episode(self, episode, samples):
        calls.append(episode)
        if len(calls) == 3:  # first episode of shard 1: shard 0 is complete, shard 1 is open
            raise RuntimeError("simulated crash")
        return original(self, episode, samples)

    monkeypatch.setattr(EpisodeEncoder, "encode", crash_on_third_episode)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_standin(v21_dataset, tmp_path)
    assert shard_files(tmp_path) == SHARDS[:1]
    assert {line["shard"] for line in index_of(tmp_path, "demo")} == {"shards/demo/t000-00000.tar"}

    monkeypatch.setattr(EpisodeEncoder, "encode", original)
    report = run_standin(v21_dataset, tmp_path)
    assert (report.shards_skipped, report.shards_written) == (1, 1)
    assert_same_samples(shards_of(tmp_path, "demo"), reference[0])
    assert index_of(tmp_path, "demo") == reference[1]


def test_killed_process_leaves_only_a_tmp_file_and_the_rerun_completes(v21_dataset, tmp_path, run_standin,
                                                                        shards_of, index_of, reference):
    # A separate process writes shard 0, writes episode 2 into shard 1 and is SIGKILLed encoding episode 3.
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from lbva.models.encoders import EncoderChoice
        from lbva.training.data.episode_encoder import EpisodeEncoder
        from lbva.training.data.prepare import PrepareConfig, prepare

        original = EpisodeEncoder.encode
        calls = []
        def encode(self, episode, samples):
            calls.append(episode)
            if len(calls) == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, episode, samples)
        EpisodeEncoder.encode = encode
        prepare(PrepareConfig(src=Path({str(v21_dataset)!r}), out=Path({str(tmp_path)!r}), target_fps=10,
                              action_channels=[0, 1], heights=[64], widths=[64],
                              encoders=EncoderChoice("standin", standin_text_dim=16), shard_samples=2))
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert shard_files(tmp_path) == ["t000-00000.tar", "t000-00001.tar.tmp"]
    assert {line["shard"] for line in index_of(tmp_path, "demo")} == {"shards/demo/t000-00000.tar"}

    report = run_standin(v21_dataset, tmp_path)
    assert (report.shards_skipped, report.shards_written) == (1, 1)
    assert shard_files(tmp_path) == SHARDS
    assert_same_samples(shards_of(tmp_path, "demo"), reference[0])
    assert index_of(tmp_path, "demo") == reference[1]


def test_index_lines_of_a_committed_shard_are_rebuilt_when_missing(v21_dataset, tmp_path, run_standin, index_of,
                                                                   reference):
    # A crash between a shard's rename and its index write: the shard is done, its lines are not.
    run_standin(v21_dataset, tmp_path)
    index = tmp_path / "index" / "demo" / "t000.jsonl"
    lines = index.read_text().splitlines()
    index.write_text("".join(line + "\n" for line in lines if "t000-00001" not in line))
    report = run_standin(v21_dataset, tmp_path)
    assert report.shards_written == 0
    assert index_of(tmp_path, "demo") == reference[1]

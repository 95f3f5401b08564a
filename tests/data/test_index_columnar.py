"""The columnar index (index.py): the same entries, fingerprint and plan order as the jsonl lines,
built by prepare or `lbva data index`, damaged tables refused naming the file, and windows that read
only their frames."""

import hashlib
import json
import logging
import pickle

import numpy as np
import pytest
import torch

from lbva.errors import UserError
from lbva.launchers.cli import main as lbva
from lbva.training.data.index import TABLE_NAME, build_table, table_path
from lbva.training.data.plan import DataPlan
from lbva.training.data.reader import SampleReader, read_index
from stream_fixtures import CHANNELS, PATCH, TEXT_TOKENS, make_loader, make_stream, take, write_prepared

SIZES = {"alpha": (1500, 6), "beta": (1000, 12), "gamma": (500, 10)}  # samples, tokens per frame
# sha1 of the window keys of the first 2000 sequences of _plan over _write_index's lines, recorded
# with the code before the columnar index (reader.read_index parsing every line into an IndexEntry).
RECORDED_ORDER = "f91b1ed4da00afe3a99c69e39b2ea97ec30c2d3c"


def _write_index(root):
    """3,000 index lines in 3 sources, two task files each, with one malformed and one duplicate
    line per source; shards named but not written (the plan reads the index alone)."""
    generator = np.random.default_rng(12)
    for source, (count, tokens_per_frame) in SIZES.items():
        folder = root / "index" / source
        folder.mkdir(parents=True, exist_ok=True)
        frames = generator.integers(2, 61, count)
        lines = [json.dumps({"key": f"{source}__e{i:06d}__s000", "source": source,
                             "shard": f"shards/{source}/t{i % 2:03d}-{i // 64:05d}.tar", "episode": i,
                             "frames": int(f), "tokens": int(f) * tokens_per_frame}) for i, f in enumerate(frames)]
        lines.insert(7, "{not json")
        lines.insert(20, lines[3])
        half = len(lines) // 2
        (folder / "t000.jsonl").write_text("\n".join(lines[:half]) + "\n")
        (folder / "t001.jsonl").write_text("\n".join(lines[half:]) + "\n")
    return root


def _plan(sources):
    return DataPlan(sources, weights={"alpha": 2, "beta": 1, "gamma": 1}, seed=3, token_budget=400,
                    window_frames=16, chunk_multiple=2, forward_dynamics=False, block_samples=64)


def _order(plan, sequences=2000) -> str:
    digest = hashlib.sha1()
    for planned in plan.sequences(plan.start()):
        if planned.index >= sequences:
            break
        digest.update((" ".join(w.key for w in planned.windows) + "\n").encode())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def lines_only(tmp_path_factory):
    return _write_index(tmp_path_factory.mktemp("lines"))


@pytest.fixture(scope="module")
def with_table(tmp_path_factory):
    root = _write_index(tmp_path_factory.mktemp("table"))
    for source in SIZES:
        build_table(root, source)
    return root


def test_the_plan_order_is_the_recorded_one_from_jsonl_lines_and_from_the_table(lines_only, with_table):
    from_lines, problems_lines = read_index([lines_only], "skip")
    from_table, problems_table = read_index([with_table], "skip")
    assert all(table_path(with_table, s.name).is_file() for s in from_table)
    assert not any(table_path(lines_only, s.name).exists() for s in from_lines)
    assert _order(_plan(from_lines)) == _order(_plan(from_table)) == RECORDED_ORDER
    assert _plan(from_lines).fingerprint == _plan(from_table).fingerprint
    assert [(p.kind, p.key) for p in problems_lines] == [(p.kind, p.key) for p in problems_table]
    assert sorted(p.kind for p in problems_table) == ["bad_index_line"] * 3 + ["duplicate_key"] * 3


def test_a_source_offers_entries_episodes_keys_and_subsets(with_table):
    (alpha, *_), _ = read_index([with_table], "skip")
    assert len(alpha) == len(alpha.entries) == SIZES["alpha"][0]
    assert alpha.entry(5) == alpha.entries[5] == list(alpha.entries)[5]
    assert alpha.entry(5).key == "alpha__e000005__s000" and alpha.entry(-1).key == "alpha__e001499__s000"
    assert alpha.episodes.dtype == np.int64 and list(alpha.episodes[:3]) == [0, 1, 2]
    assert alpha.keys(np.array([2, 0])) == ["alpha__e000002__s000", "alpha__e000000__s000"]
    positions = np.array([9, 3, 4])
    held_out = alpha.subset(positions, "eval")
    assert [e.key for e in held_out.entries] == alpha.keys(positions)
    assert list(held_out.episodes) == [9, 3, 4] and held_out.keys([0]) == ["alpha__e000009__s000"]
    assert held_out.subset(np.array([2]), "x").entry(0) == alpha.entry(4)
    fingerprints = {alpha.fingerprint, held_out.fingerprint, alpha.subset(positions, "train").fingerprint,
                    alpha.subset(positions[::-1], "eval").fingerprint}
    assert len(fingerprints) == 4 and alpha.subset(positions, "eval").fingerprint == held_out.fingerprint
    with pytest.raises(IndexError):
        alpha.entry(len(alpha))


def test_a_table_source_travels_to_a_worker_as_its_path(with_table):
    (alpha, *_), _ = read_index([with_table], "skip")
    blob = pickle.dumps(alpha.subset(np.arange(10, 20), "part"))
    assert len(blob) < 4096
    copy = pickle.loads(blob)
    assert [e.key for e in copy.entries] == alpha.keys(np.arange(10, 20))


def test_a_table_older_than_its_jsonl_lines_is_not_used(tmp_path, caplog):
    root = _write_index(tmp_path)
    build_table(root, "gamma")
    index = root / "index" / "gamma" / "t001.jsonl"
    lines = index.read_text().splitlines()
    index.write_text("\n".join(lines[:-1]) + "\n")
    with caplog.at_level(logging.WARNING, logger="lbva.data"):
        sources, _ = read_index([root], "skip")
    assert len(sources[2]) == SIZES["gamma"][0] - 1
    assert any(TABLE_NAME in r.message and "lbva data index" in r.message for r in caplog.records)


DAMAGE = {
    "magic": lambda data: b"NOTANIDX" + data[8:],
    "cut": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "header": lambda data: data.replace(b'"count"', b'"c0unt"', 1),
    "frames": lambda data: data.replace(b'"latent_frames": {"dtype": "<i4"', b'"latent_frames": {"dtype": "<f8"'),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_table_is_one_user_error_naming_the_file(with_table, tmp_path, damage):
    root = _write_index(tmp_path)
    path = table_path(root, "beta")
    path.write_bytes(DAMAGE[damage](table_path(with_table, "beta").read_bytes()))
    with pytest.raises(UserError) as raised:
        read_index([root], "skip")
    message = str(raised.value)
    assert str(path) in message and "\n" not in message and "lbva data index" in message


def test_out_of_range_column_values_are_refused(tmp_path):
    root = _write_index(tmp_path)
    table = build_table(root, "alpha")
    table.columns["latent_frames"][0] = 0
    table.write(table_path(root, "alpha"))
    with pytest.raises(UserError, match="out of range"):
        read_index([root], "skip")


def test_lbva_data_index_builds_tables_with_byte_ranges_for_an_old_dataset(tmp_path, capsys):
    write_prepared(tmp_path, {"alpha": [5, 9, 3], "beta": [4, 6]})
    before = take(make_loader([tmp_path]), 6)
    assert lbva(["data", "index", str(tmp_path)]) == 0
    assert "alpha: 3 samples" in capsys.readouterr().out
    sources, _ = read_index([tmp_path], "fail")
    assert all(e.byte_range is not None for s in sources for e in s.entries)
    after = take(make_loader([tmp_path]), 6)
    assert [s.window_keys for s in before] == [s.window_keys for s in after]
    assert all(torch.equal(a.video_x0, b.video_x0) for a, b in zip(before, after))


def test_lbva_data_index_on_a_folder_without_an_index_is_a_user_error(tmp_path, capsys):
    assert lbva(["data", "index", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err


def test_a_window_reads_only_its_frames(tmp_path):
    prepared = write_prepared(tmp_path, {"alpha": [400]})
    assert lbva(["data", "index", str(tmp_path)]) == 0
    stream = make_stream([tmp_path])
    entry = stream.sources[0].entry(0)
    reader = SampleReader(stream.sources, text_tokens=TEXT_TOKENS, latent_channels=CHANNELS, patch=PATCH)
    window = reader.load_frames(entry, 12, 4)
    window_bytes = reader.shards.bytes_read
    assert torch.equal(window.latents, torch.from_numpy(prepared.latents[entry.key][:, 12:16].astype(np.float32)))
    assert window.actions.shape[1] == 4
    whole = reader.load(entry)
    whole_bytes = reader.shards.bytes_read - window_bytes
    assert whole.latents.shape[1] == 400
    frame_bytes = CHANNELS * 4 * 4 * 2 + 30 * 2 * 4  # latents and actions of one frame
    headers = 8 * 1024  # tar headers (pax ones included), npy headers, meta.json and action_mask
    assert whole_bytes > 400 * frame_bytes and window_bytes < 4 * frame_bytes + headers


def test_the_stream_plans_over_the_selected_sources(tmp_path):
    write_prepared(tmp_path, {"alpha": [5, 6, 7, 8], "beta": [4, 6]})

    def keep_first_two_of_alpha(sources):
        return [s.subset(np.arange(2), "first") if s.name == "alpha" else s for s in sources]

    stream = make_stream([tmp_path], select=keep_first_two_of_alpha)
    assert [len(s) for s in stream.sources] == [2, 2]
    keys = {w.sample.key for b in stream.plan.plan_block(stream.plan.start())[0] for w in b}
    assert keys <= {"alpha__e000000__s000", "alpha__e000001__s000", "beta__e000000__s000", "beta__e000001__s000"}
    assert stream.plan.fingerprint != make_stream([tmp_path]).plan.fingerprint


def test_prepare_writes_the_table_and_byte_ranges(v21_dataset, tmp_path, run_standin, index_of):
    run_standin(v21_dataset, tmp_path, source="demo")
    lines = index_of(tmp_path, "demo")
    assert all(line["offset"] >= 0 and line["size"] > 0 for line in lines)
    sources, problems = read_index([tmp_path], "fail")
    assert table_path(tmp_path, "demo").is_file() and not problems
    assert [e.key for e in sources[0].entries] == [line["key"] for line in lines]

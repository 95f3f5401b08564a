"""Two gloo ranks reading different samples: a sample of a dtype packing cannot take is skipped
by the rank that reads it and both ranks finish; under data.on_error='fail' both ranks stop with
the same one-line DataError (no rank left waiting in a collective)."""

import tarfile

import pytest
import torch.distributed as dist
from rich.console import Console

from lbva.training import trainer
from lbva.training.distributed import Processes
from lbva.training.data.reader import DataError

from helpers import prepared_demo, tiny_train_config
from parallel.harness import spawn_ranks

# In this data's order dp rank 1 reads this sample at step 1, rank 0 first at step 3: the first
# failure is one rank's alone, in the loop.
BAD = "pusher__e000001__s000"


def string_latents(prepared, key: str) -> None:
    """Turn the sample's float16 latents into 2-byte strings in place: same size, same byte ranges."""
    for shard in sorted((prepared / "shards").rglob("*.tar")):
        with tarfile.open(shard) as tar:
            member = next((m for m in tar.getmembers() if m.name == f"{key}.latents.npy"), None)
        if member is None:
            continue
        data = bytearray(shard.read_bytes())
        header = data.index(b"'descr': '<f2'", member.offset_data)
        data[header:header + 14] = b"'descr': '|S2'"
        shard.write_bytes(bytes(data))
        return
    raise AssertionError(f"{key} is in no shard")


def _train(config):
    with pytest.MonkeyPatch.context() as patch:
        # The harness ends the process group after this function; a finished run would end it first.
        patch.setattr(Processes, "close", lambda _: dist.barrier())
        try:
            return trainer.train(config, Console(quiet=True)).steps
        except DataError as error:
            return str(error)


COMMON = ("parallel.dp_shard=2", "run.steps=3", "run.eval_every=1000", "data.validation_fraction=0",
          "checkpoint.async_save=false")


def test_a_bad_dtype_is_skipped_on_its_rank_and_both_ranks_finish(tmp_path):
    prepared = prepared_demo(tmp_path / "data", num_episodes=4, frames_per_episode=33, image_size=64, seed=1)
    string_latents(prepared, BAD)
    config = tiny_train_config(prepared, tmp_path, "run.name=skip", "data.max_skipped_fraction=0.5", *COMMON)
    assert spawn_ranks(2, _train, config) == [3, 3]
    ledger = "".join(path.read_text() for path in (tmp_path / "skip" / "ledger").iterdir())
    assert "pusher__e000000__s000" in ledger and BAD not in ledger
    assert (tmp_path / "skip" / "model.safetensors").exists()

    fail = tiny_train_config(prepared, tmp_path, "run.name=fail", "data.on_error=fail", *COMMON)
    messages = set(spawn_ranks(2, _train, fail))
    assert len(messages) == 1, "both ranks stop with the same message"
    message = messages.pop()
    assert message.startswith(f"undecodable: sample {BAD} in ") and "\n" not in message
    assert not (tmp_path / "fail" / "model.safetensors").exists()
    assert not (tmp_path / "fail" / "ledger" / "dp0.jsonl").read_text()  # stopped at step 1, on both ranks

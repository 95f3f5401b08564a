"""The complete post-training folder (transformer, VAE, text encoder, tokenizer, empty_emb.pt,
manifest) and `lbva export check`."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lbva.checkpoints_tools.export import write_weights_checkpoint
from lbva.checkpoints_tools.post_training import MANIFEST
from lbva.launchers.cli import main
from lbva.models.config import get_preset
from lbva.models.mot import LingBotVA

pytest.importorskip("diffusers", reason="the tiny Wan VAE folder is written with diffusers")
pytest.importorskip("transformers", reason="the tiny umT5 and its tokenizer are written with transformers")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny checkpoint and tiny local VAE / umT5 (+ tokenizer) folders."""
    from lbva.training.data.tiny_models import write_tiny_umt5, write_tiny_wan_vae

    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    checkpoint = write_weights_checkpoint(LingBotVA(get_preset("tiny-mot")), root / "ckpt", "tiny-mot", "test")
    vae = write_tiny_wan_vae(root / "vae")
    text = write_tiny_umt5(root / "umt5", ["pick", "the", "cup"])
    return checkpoint, vae, text


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _export(sources, out):
    checkpoint, vae, text = sources
    return main(["export", "post-training", str(checkpoint), str(out), "--vae", str(vae),
                 "--text-encoder", str(text), "--tokenizer", str(text)])


def _check(out, checkpoint):
    return main(["export", "check", str(out), "--checkpoint", str(checkpoint)])


def test_complete_export_holds_every_component_and_a_manifest(sources, tmp_path):
    assert _export(sources, tmp_path / "out") == 0
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["step"] == 0 and manifest["preset"] == "tiny-mot"
    assert manifest["components"]["vae"] == str(sources[1].resolve())
    assert {"vae/config.json", "text_encoder/config.json", "tokenizer/tokenizer_config.json", "empty_emb.pt",
            "transformer/config.json"} <= set(manifest["files"])
    for name, entry in manifest["files"].items():
        assert _sha256(tmp_path / "out" / name) == entry["sha256"]


def test_empty_emb_is_512_tokens_zero_padded_past_the_eos(sources, tmp_path):
    _export(sources, tmp_path / "out")
    emb = torch.load(tmp_path / "out" / "empty_emb.pt")
    assert emb.shape == (512, 32)
    assert emb[0].abs().sum() > 0 and emb[1:].eq(0).all()  # "" is one token: </s>


def test_export_without_components_says_they_are_absent(sources, tmp_path):
    assert main(["export", "post-training", str(sources[0]), str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["components"] == {"vae": None, "text_encoder": None, "tokenizer": None}
    assert not manifest["empty_emb"]


def test_check_passes_on_a_fresh_export_with_zero_difference(sources, tmp_path, capsys):
    _export(sources, tmp_path / "out")
    assert _check(tmp_path / "out", sources[0]) == 0
    assert "max abs difference 0" in capsys.readouterr().out


def test_check_fails_when_one_byte_of_a_weight_file_is_flipped(sources, tmp_path, capsys):
    _export(sources, tmp_path / "out")
    shard = sorted((tmp_path / "out" / "transformer").glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert _check(tmp_path / "out", sources[0]) == 2
    assert "sha256" in capsys.readouterr().err


def test_check_fails_when_a_weight_changes_even_with_its_sha_updated(sources, tmp_path, capsys):
    out = tmp_path / "out"
    _export(sources, out)
    shard = sorted((out / "transformer").glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(shard), metadata={"format": "pt"})
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"][str(shard.relative_to(out))]["sha256"] = _sha256(shard)
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert _check(out, sources[0]) == 2
    assert "outputs" in capsys.readouterr().err


def test_a_vae_folder_without_config_is_refused_in_one_line_naming_it(sources, tmp_path, capsys):
    checkpoint, _, text = sources
    (tmp_path / "vae").mkdir()
    status = main(["export", "post-training", str(checkpoint), str(tmp_path / "out"), "--vae", str(tmp_path / "vae"),
                   "--text-encoder", str(text), "--tokenizer", str(text)])
    error = capsys.readouterr().err.strip()
    assert status == 2 and len(error.splitlines()) == 1
    assert str(tmp_path / "vae") in error and "config.json" in error
    assert not (tmp_path / "out").exists()

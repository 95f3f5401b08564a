"""The video and text encoders of data preparation and inference, behind one small interface with two
implementations.

    VideoEncoder.encode(pixels [B, 3, T, H, W] in [-1, 1]) -> latents [B, z_dim, 1 + (T-1)/4, H/16, W/16]
    TextEncoder.encode([text, ...]) -> [[L_i, text_dim], ...], the true length of each text only,
    each text first cleaned by `prompt_clean` (Wan's: ftfy, HTML unescape, whitespace collapse)

"real": the Wan2.2 VAE (diffusers AutoencoderKLWan; latents are the normalised posterior mean
(mu - latents_mean) / latents_std of spec 2.1) and umT5 (transformers UMT5EncoderModel; 512-token
padding, outputs cut to the tokenizer's attention mask), both loaded from local folders.
"standin": the deterministic stand-ins of models/standin_encoders.py, for the demo and tests.

`EncoderChoice` names what to load; it is small and picklable, so each worker process loads its own
encoder from it, and `describe()` gives the card entry (paths and configs) without loading weights.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from lbva.errors import UserError
from lbva.models.standin_encoders import StandInTextEncoder, StandInVideoEncoder

ENCODER_KINDS = ("real", "standin")
TEXT_MAX_LENGTH = 512  # umT5 prompts are padded to 512 tokens (spec 6.2: text_emb [512, 4096])
TEXT_BATCH = 8  # texts per umT5 call: a 512 x 4096 activation per text bounds the batch


def prompt_clean(text: str) -> str:
    """Wan's prompt cleaning, applied before every tokenization (data preparation and inference) so that
    the same words give the same tokens however they were typed: fix mojibake (ftfy, when installed),
    undo up to two levels of HTML escaping ("&amp;amp;" -> "&"), and collapse runs of whitespace."""
    return re.sub(r"\s+", " ", _basic_clean(text)).strip()


def _basic_clean(text: str) -> str:
    """ftfy.fix_text when ftfy is importable (the reference's dependency; without it mojibake is left as
    is, the only difference), then a double HTML unescape, then strip."""
    try:
        import ftfy
    except ImportError:
        pass
    else:
        text = ftfy.fix_text(text)
    return html.unescape(html.unescape(text)).strip()


class VideoEncoder(Protocol):
    z_dim: int
    spatial_factor: int
    temporal_factor: int

    def encode(self, pixels: torch.Tensor) -> torch.Tensor: ...


class TextEncoder(Protocol):
    text_dim: int

    def encode(self, texts: Sequence[str]) -> list[torch.Tensor]: ...


class WanVideoEncoder:
    """The Wan2.2 VAE: pixels [B, 3, T, H, W] in [-1, 1] -> normalised posterior means, float32 on the CPU."""

    def __init__(self, folder: Path, device: str) -> None:
        from diffusers import AutoencoderKLWan

        self.vae = AutoencoderKLWan.from_pretrained(folder).to(device).eval()
        config = self.vae.config
        self.device = device
        self.z_dim = int(config.z_dim)
        self.spatial_factor = int(config.scale_factor_spatial)
        self.temporal_factor = int(config.scale_factor_temporal)
        self.mean = torch.tensor(config.latents_mean, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(config.latents_std, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = self.vae.encode(pixels.to(self.device)).latent_dist.mean.float()
        return ((mean - self.mean) / self.std).cpu()

    @torch.no_grad()
    def decode_frames(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [z, F, h, w] -> uint8 [F, H, W, 3]: the decoded video's first frame
        and then the last frame of each latent frame's group of `temporal_factor` frames."""
        raw = latents[None].to(self.device) * self.std + self.mean
        video = self.vae.decode(raw).sample[0].float().clamp(-1, 1)  # [3, 1 + 4(F-1), H, W]
        chosen = video[:, :: self.temporal_factor]
        return ((chosen.permute(1, 2, 3, 0) + 1.0) * 127.5).round().to(torch.uint8).cpu()


class UMT5TextEncoder:
    """umT5: texts -> last hidden states cut to each text's tokens (EOS included), float32 on the CPU."""

    def __init__(self, tokenizer_folder: Path, model_folder: Path, device: str) -> None:
        from transformers import AutoTokenizer, UMT5EncoderModel

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
        self.model = UMT5EncoderModel.from_pretrained(model_folder).to(device).eval()
        self.device = device
        self.text_dim = int(self.model.config.d_model)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> list[torch.Tensor]:
        out = []
        for first in range(0, len(texts), TEXT_BATCH):
            cleaned = [prompt_clean(text) for text in texts[first:first + TEXT_BATCH]]
            batch = self.tokenizer(cleaned, max_length=TEXT_MAX_LENGTH,
                                   padding="max_length", truncation=True, add_special_tokens=True,
                                   return_attention_mask=True, return_tensors="pt")
            mask = batch.attention_mask.to(self.device)
            hidden = self.model(input_ids=batch.input_ids.to(self.device), attention_mask=mask).last_hidden_state
            out += [h[:n].float().cpu() for h, n in zip(hidden, mask.sum(1).tolist())]
        return out


class StandInVideo:
    """StandInVideoEncoder behind the VideoEncoder interface (pixels are requantised to uint8 for it)."""

    z_dim = StandInVideoEncoder.z_dim
    spatial_factor = StandInVideoEncoder.spatial_factor
    temporal_factor = StandInVideoEncoder.temporal_factor

    def __init__(self) -> None:
        self._encoder = StandInVideoEncoder()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        # One float temporary, rounded and clamped in place (the fresh buffer per operation cost
        # as much as the stand-in's encode at 2 cameras of 128 px).
        frames = pixels.add(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 4, 1)
        return torch.stack([self._encoder.encode(clip) for clip in frames])  # clip: [T, H, W, 3]


class StandInText:
    """StandInTextEncoder behind the TextEncoder interface: one row per word, as many rows as words."""

    def __init__(self, text_dim: int) -> None:
        self._encoder = StandInTextEncoder(text_dim=text_dim, max_tokens=TEXT_MAX_LENGTH)
        self.text_dim = text_dim

    def encode(self, texts: Sequence[str]) -> list[torch.Tensor]:
        cleaned = [prompt_clean(text) for text in texts]
        return [self._encoder.encode(text)[: len(self._encoder.token_ids(text))] for text in cleaned]


def _read_config(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path} is missing; {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err})") from err


@dataclass(frozen=True)
class EncoderChoice:
    """Which encoders to use: `kind` "real" loads `vae` and `text_encoder` folders, "standin" needs neither.

    `vae` is a diffusers AutoencoderKLWan folder, or a Wan2.2 diffusers root holding vae/;
    `text_encoder` holds a tokenizer and a UMT5EncoderModel, or is a root with tokenizer/ and text_encoder/.
    """

    kind: str = "standin"
    vae: Path | None = None
    text_encoder: Path | None = None
    standin_text_dim: int = 4096

    def describe(self) -> dict:
        """The card entry: {"kind", "video": {...}, "text": {...}} with folders, configs and the video
        geometry (z_dim, spatial_factor, temporal_factor). Checks the folders; loads no weights."""
        if self.kind == "standin":
            return {"kind": "standin",
                    "video": {"z_dim": StandInVideo.z_dim, "spatial_factor": StandInVideo.spatial_factor,
                              "temporal_factor": StandInVideo.temporal_factor},
                    "text": {"text_dim": self.standin_text_dim, "max_length": TEXT_MAX_LENGTH}}
        if self.kind != "real":
            raise UserError(f"unknown encoders '{self.kind}'; choose one of {', '.join(ENCODER_KINDS)}")
        if self.vae is None or self.text_encoder is None:
            raise UserError("--encoders real needs --vae DIR and --text-encoder DIR")
        vae = self._vae_folder()
        config = _read_config(vae / "config.json", "--vae needs an AutoencoderKLWan folder (config.json + weights)")
        z_dim = int(config.get("z_dim", 0))
        if len(config.get("latents_mean", [])) != z_dim or len(config.get("latents_std", [])) != z_dim:
            raise UserError(f"{vae / 'config.json'}: latents_mean and latents_std need z_dim = {z_dim} values each")
        tokenizer, model = self._text_folders()
        text_config = _read_config(model / "config.json", "--text-encoder needs a UMT5EncoderModel folder")
        if "d_model" not in text_config:
            raise UserError(f"{model / 'config.json'} has no d_model; is it a umT5 config?")
        return {"kind": "real",
                "video": {"path": str(vae.resolve()), "z_dim": z_dim,
                          "spatial_factor": int(config.get("scale_factor_spatial", 8)),
                          "temporal_factor": int(config.get("scale_factor_temporal", 4)), "config": config},
                "text": {"path": str(model.resolve()), "tokenizer_path": str(tokenizer.resolve()),
                         "text_dim": int(text_config["d_model"]), "max_length": TEXT_MAX_LENGTH,
                         "config": text_config}}

    def video(self, device: str) -> VideoEncoder:
        """Load the video encoder on `device`."""
        return StandInVideo() if self.kind == "standin" else WanVideoEncoder(self._vae_folder(), device)

    def text(self, device: str) -> TextEncoder:
        """Load the text encoder on `device`."""
        if self.kind == "standin":
            return StandInText(self.standin_text_dim)
        return UMT5TextEncoder(*self._text_folders(), device)

    def _vae_folder(self) -> Path:
        root = Path(self.vae)
        return root / "vae" if (root / "vae" / "config.json").is_file() else root

    def _text_folders(self) -> tuple[Path, Path]:
        """(tokenizer folder, model folder)."""
        root = Path(self.text_encoder)
        if (root / "text_encoder").is_dir():
            return root / "tokenizer", root / "text_encoder"
        return root, root


def default_device() -> str:
    """CUDA when this process sees a GPU, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"

"""Tiny, randomly initialised stand-ins of the real encoder checkpoints, saved in their real formats.

They let the demo and the tests run the real loading and encoding code (diffusers AutoencoderKLWan,
transformers umT5) without any model hub: the Wan2.2 VAE geometry (z_dim 48, 16x spatial with the
2x2 pixel patch, 4x temporal) with tiny widths, and a umT5 encoder with a word-level tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch


def write_tiny_wan_vae(folder: Path, seed: int = 0, calibration_clips: Iterable[np.ndarray] = ()) -> Path:
    """A random AutoencoderKLWan of the Wan2.2 geometry, saved to folder.

    Its latents_mean / latents_std are, as the real Wan2.2 VAE's are, per-channel statistics of the
    posterior means over data: computed here on `calibration_clips` (uint8 [T, H, W, 3] with
    T = 1 + 4k), so the normalised latents this VAE writes have zero mean and unit variance per
    channel on that data. Without clips the statistics are random placeholders, and a random VAE's
    latents then have a variance of a few hundredths: a scale no real VAE gives, at which a
    denoiser learns almost nothing but the noise.
    """
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    generator = np.random.default_rng(seed)
    vae = AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
        scale_factor_spatial=16, scale_factor_temporal=4,
        latents_mean=generator.normal(0, 0.1, 48).round(4).tolist(),
        latents_std=generator.uniform(0.5, 2.0, 48).round(4).tolist(),
    )
    clips = list(calibration_clips)
    if clips:
        mean, std = _posterior_statistics(vae, clips)
        vae.register_to_config(latents_mean=mean, latents_std=std)
    vae.save_pretrained(folder)
    return Path(folder)


@torch.no_grad()
def _posterior_statistics(vae, clips: list[np.ndarray]) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of the VAE's posterior means over the clips."""
    means = []
    for clip in clips:
        pixels = torch.from_numpy(clip).float().div(127.5).sub(1.0).permute(3, 0, 1, 2)[None]  # [1, 3, T, H, W]
        means.append(vae.encode(pixels).latent_dist.mean[0].flatten(1))  # [z_dim, F*h*w]
    latents = torch.cat(means, dim=1).double()
    return latents.mean(1).tolist(), latents.std(1).clamp_min(1e-6).tolist()


def write_tiny_umt5(folder: Path, words: Iterable[str], d_model: int = 32, seed: int = 0) -> Path:
    """A random UMT5EncoderModel of width d_model and a word-level tokenizer over `words` that appends
    </s> as T5's does, saved together in folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    UMT5EncoderModel(config).save_pretrained(folder)
    return Path(folder)


CALIBRATION_EPISODES = 2  # episodes of the dataset whose first clip calibrates the tiny VAE
CALIBRATION_FRAMES = 9  # 1 + 4k frames per clip


def write_tiny_encoders(out: Path, vocab_from: Path | None = None) -> tuple[Path, Path]:
    """`lbva data tiny-encoders`: the tiny VAE in out/vae and the tiny umT5 (32 wide, the demo and
    tiny presets' text_dim) in out/text_encoder -> the two folders, for `--vae` / `--text-encoder`.

    With `vocab_from` (a LeRobot folder) the umT5 knows every prompt word of that dataset and the
    VAE's latent statistics are computed on its first camera's clips, so its latents have unit
    variance on that data; without it every word is <unk> and the statistics are placeholders.
    """
    from lbva.training.data.describe import prompt_words
    from lbva.training.data.lerobot import LeRobotDataset

    words: list[str] = []
    clips: list[np.ndarray] = []
    if vocab_from is not None:
        dataset = LeRobotDataset(vocab_from)
        words = prompt_words(dataset.texts())
        if dataset.camera_keys:
            clips = [_calibration_clip(dataset, episode) for episode in dataset.episode_indices[:CALIBRATION_EPISODES]]
            clips = [clip for clip in clips if clip is not None]
    return write_tiny_wan_vae(out / "vae", calibration_clips=clips), write_tiny_umt5(out / "text_encoder", words)


def _calibration_clip(dataset, episode: int) -> np.ndarray | None:
    """The first CALIBRATION_FRAMES frames of the episode's first camera, cropped to the VAE's
    16 px grid (None for an episode shorter than that)."""
    if dataset.episode_length(episode) < CALIBRATION_FRAMES:
        return None
    frames = dataset.read_episode(episode, frame_indices=range(CALIBRATION_FRAMES)).frames[dataset.camera_keys[0]]
    height, width = (frames.shape[1] // 16) * 16, (frames.shape[2] // 16) * 16
    return frames[:, :height, :width]

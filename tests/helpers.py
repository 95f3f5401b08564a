"""Small builders shared by tests."""

from __future__ import annotations

from pathlib import Path

import torch

from lbva.models.action_space import ACTION_DIM
from lbva.training.config import TrainConfig
from lbva.training.config_io import load_config
from lbva.training.data.packing import PackedSequence, build_packed_sequence, cut_windows
from lbva.training.data.samples import EpisodeSample

PATCH = (1, 2, 2)
PAD_MULTIPLE = 32


def random_sample(
    key: str, generator: torch.Generator, *, frames: int = 5, height: int = 8, width: int = 8,
    actions_per_frame: int = 4, channels: tuple[int, ...] = (0, 1), text_tokens: int = 6, text_dim: int = 32,
    latent_channels: int = 48,
) -> EpisodeSample:
    mask = torch.zeros(ACTION_DIM, dtype=torch.bool)
    mask[list(channels)] = True
    actions = torch.randn(ACTION_DIM, frames, actions_per_frame, generator=generator) * mask[:, None, None]
    actions[:, 0] = 0
    return EpisodeSample(
        key=key,
        source=key.split("/")[0],
        latents=torch.randn(latent_channels, frames, height, width, generator=generator),
        actions=actions,
        action_mask=mask,
        text_emb=torch.randn(text_tokens, text_dim, generator=generator),
    )


def prepared_demo(root: Path, *, num_episodes: int, frames_per_episode: int, image_size: int = 64, seed: int = 0,
                  text_dim: int = 32) -> Path:
    """A demo-world LeRobot dataset (source 'pusher', 20 fps, actions in slots 0 and 1) prepared at 10 fps
    with the stand-in encoders: the prepared folder root/prepared, ready for data.prepared."""
    from lbva.models.encoders import EncoderChoice
    from lbva.training.data.demo_world import generate_demo_dataset
    from lbva.training.data.prepare import PrepareConfig, prepare

    lerobot = generate_demo_dataset(root / "pusher", num_episodes=num_episodes,
                                    frames_per_episode=frames_per_episode, image_size=image_size, seed=seed)
    prepare(PrepareConfig(src=lerobot, out=root / "prepared", action_channels=[0, 1], heights=[image_size],
                          widths=[image_size], encoders=EncoderChoice("standin", standin_text_dim=text_dim)))
    return root / "prepared"


def tiny_sequence(seed: int, *, text_dim: int = 32) -> PackedSequence:
    """Two 3-frame episodes of 4 x 4 latents packed into one sequence (64 video + 32 action tokens)."""
    generator = torch.Generator().manual_seed(seed)
    samples = [
        random_sample(f"src{i}/{seed}", generator, frames=3, height=4, width=4, text_dim=text_dim) for i in range(2)
    ]
    windows = [w for s in samples for w in cut_windows(s, 3, 1)]
    return build_packed_sequence(windows, PATCH, pad_multiple=PAD_MULTIPLE, forward_dynamics=False)


def tiny_train_config(dataset: Path, out: Path, *overrides: str):
    """The resume tests' one-process run: tiny-mot on `dataset` (prepared), short windows, a
    checkpoint written asynchronously, every step logged; `overrides` as on the command line."""
    return load_config(TrainConfig, overrides=[
        "model.preset=tiny-mot", f"data.prepared=['{dataset}']", f"run.output_dir={out}",
        "data.text_tokens=8", "data.window_frames=4", "data.token_budget=256", "data.pad_multiple=32",
        "optim.warmup_steps=2", "run.log_every=1", "checkpoint.async_save=true", *overrides,
    ])

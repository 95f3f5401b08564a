"""Does the video objective learn? The trained model's video flow-matching loss beside two references
on the same draws (the diagnosis of the evaluation issue's item 0):

- the per-dimension Gaussian-prior denoiser (training/baselines.py): knows each latent channel's
  mean and variance and nothing else; a model that does not beat it has learned no world;
- the rank floor of the model's own video output layer: the loss of the best prediction inside
  the affine span of `proj_out` (bias + column space), given the true target. A stream narrower
  than a video token cannot go below it however long it trains.

    python bench/video_objective.py --run RUN_DIR [--data PREPARED] [--sequences 8] [--json OUT]

RUN_DIR is a finished `lbva train` run (model.safetensors, config.toml); the data defaults to the
run's own data.prepared. Without --run, an untrained model of --preset is scored (its rank floor
holds for any weights).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from lbva.models.masks import NOISY
from lbva.models.mot import LingBotVA
from lbva.training.baselines import channel_statistics, score_against_prior
from lbva.training.config import TrainConfig
from lbva.training.config_io import load_config
from lbva.training.data.loader import PreparedStream
from lbva.training.data.reader import SampleReader, read_index
from lbva.training.step import FlowMatchingObjective
from lbva.training.trainer import sequence_generator


def score(config: TrainConfig, model: LingBotVA, prepared: list[Path], sequences: int, seed: int) -> dict:
    sources, _ = read_index(prepared, "fail")
    reader = SampleReader(sources, text_tokens=config.data.text_tokens, latent_channels=model.config.in_channels,
                          patch=model.config.patch_size)
    mean_c, var_c = channel_statistics([reader.load(e).latents for s in sources for e in s.entries])
    patch = model.config.patch_size
    stream = PreparedStream(
        prepared, rank=0, world_size=1, latent_channels=model.config.in_channels, text_tokens=config.data.text_tokens,
        weights=config.data.weights(), on_error="fail", patch=patch, window_frames=config.data.window_frames,
        chunk_multiple=config.objective.chunk_size[1], token_budget=config.data.token_budget,
        pad_multiple=config.data.pad_multiple, forward_dynamics=False, seed=seed,
    )
    objective = FlowMatchingObjective(config.objective, stream.empty_text)
    weight, bias = model.proj_out.weight.detach(), model.proj_out.bias.detach()
    span, _ = torch.linalg.qr(weight)  # [D, width] orthonormal basis of the output layer's columns
    drawn = [(item.sequence, objective.draw(item.sequence, sequence_generator(seed, 10_000 + index, 0)))
             for index, item in zip(range(sequences), iter(stream))]
    rows = []
    for scored in score_against_prior(objective, model, drawn, mean_c, var_c):
        target = scored.batch.targets.video_target
        best_in_span = bias + (target - bias) @ span @ span.T
        noisy = scored.batch.targets.video_role == NOISY
        floor = objective.losses(scored.batch.targets, best_in_span, scored.action_pred).video.item()
        rows.append([*scored.video_losses(objective), floor, target[noisy].var().item()])
    model_loss, prior_loss, floor, target_var = torch.tensor(rows).mean(0).tolist()
    return {"fm_video": model_loss, "fm_video_gaussian_prior": prior_loss, "fm_video_rank_floor": floor,
            "target_variance": target_var, "latent_variance": float(var_c.mean()),
            "latent_channel_variance": [float(var_c.min()), float(var_c.max())],
            "video_width": model.config.video_width, "video_token_dim": model.config.video_token_dim,
            "sequences": sequences}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a finished lbva train run directory")
    parser.add_argument("--config", type=Path, default=Path("configs/demo.toml"), help="without --run")
    parser.add_argument("--data", type=Path, action="append", help="prepared dataset(s); default: the run's")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--seed", type=int, default=99)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    config = load_config(TrainConfig, args.run / "config.toml" if args.run else args.config)
    torch.manual_seed(config.run.seed)
    model = LingBotVA(config.model.model_config())
    if args.run:
        model.load_state_dict(load_file(args.run / "model.safetensors"))
    result = score(config, model, args.data or list(config.data.prepared), args.sequences, args.seed)
    result.update(preset=config.model.preset, trained=bool(args.run))
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

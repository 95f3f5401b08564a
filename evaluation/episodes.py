"""One held-out episode through the world model's sampler (inference/world_model.py), chunk by chunk.

Chunk c holds latent frames [cK, (c+1)K); frame 0 is the observed first frame. Three passes:

- one chunk ahead, for c = 1 .. C-1, with ground truth of chunks < c in the cache: the imagined
  latents of c against the truth and against copying frame cK-1 (copy-last-frame); then the truth
  of c's video is cached and its actions are predicted (inverse dynamics) and compared on the slots
  the source fills, against the training mean action and zero; then c's true actions are cached.
  This pass runs twice: with the point prediction (one Euler step from pure noise, which is the
  model's estimate of the conditional mean E[x0 | context], the prediction a squared error
  rewards, averaged over `point_draws` noise draws: each one-step estimate also carries how well
  the model hands its input noise back, which the average removes) and with samples (the
  sampler's settings). A sample, even of a perfect model, scores the truth's own spread on top:
  twice the conditional variance in expectation.
- open loop, from the true chunk 0: every later chunk is sampled from the model's own previous
  samples and the true actions, up to `rollout_chunks`; against copying frame K-1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lbva.errors import UserError
from lbva.inference.world_model import WorldModelSampler
from lbva.training.data.samples import EpisodeSample


@dataclass
class EpisodeScores:
    key: str
    source: str
    video_se: list[float] = field(default_factory=list)  # per chunk: mean squared latent error (point)
    video_sampled_se: list[float] = field(default_factory=list)
    copy_last_se: list[float] = field(default_factory=list)
    action_se: list[float] = field(default_factory=list)  # per chunk, on the source's action slots (point)
    action_sampled_se: list[float] = field(default_factory=list)
    action_mean_se: list[float] = field(default_factory=list)
    action_zero_se: list[float] = field(default_factory=list)
    rollout_se: list[float] = field(default_factory=list)  # per open-loop chunk (horizon 1, 2, ...)
    rollout_copy_se: list[float] = field(default_factory=list)


def chunk_actions(sample: EpisodeSample, chunk: int, k: int) -> torch.Tensor:
    """The actions of `chunk` as tokens [K*N, 30] (frame-major, as packing lays them out)."""
    actions = sample.actions[:, chunk * k:(chunk + 1) * k]  # [30, K, N]
    return actions.permute(1, 2, 0).reshape(-1, actions.shape[0])


def _se(prediction: torch.Tensor, truth: torch.Tensor) -> float:
    return float(((prediction.float() - truth.float()) ** 2).mean())


def start_episode(sampler: WorldModelSampler, sample: EpisodeSample, empty_text: torch.Tensor) -> None:
    rows = [sample.text_emb, empty_text] if sampler.settings.use_cfg else [sample.text_emb]
    sampler.start(torch.stack(rows))
    sampler.set_first_frame(sample.latents[:, :1])


def score_episode(sampler: WorldModelSampler, point: WorldModelSampler, sample: EpisodeSample,
                  empty_text: torch.Tensor, mean_action: torch.Tensor,
                  rollout_chunks: int, point_draws: int = 1) -> tuple[EpisodeScores, torch.Tensor]:
    """`sampler` samples, `point` (one video and one action step) predicts the conditional mean
    (the mean of `point_draws` one-step estimates); -> the scores, and the open-loop sampled
    latents [z, K * (1 + rollout), h, w] (chunk 0 true)."""
    k = sampler.settings.chunk_size
    if sample.latents.shape[1] // k < 2:
        raise UserError(f"lbva eval: held-out sample {sample.key} has {sample.latents.shape[1]} latent frames, "
                        f"fewer than two chunks of {k}; give a smaller --chunk-size")
    scores = EpisodeScores(sample.key, sample.source)
    _one_chunk_ahead(point, sample, empty_text, scores.video_se, scores.action_se, point_draws)
    _one_chunk_ahead(sampler, sample, empty_text, scores.video_sampled_se, scores.action_sampled_se)
    for c in range(1, sample.latents.shape[1] // k):
        truth = sample.latents[:, c * k:(c + 1) * k]
        scores.copy_last_se.append(_se(sample.latents[:, c * k - 1:c * k].expand_as(truth), truth))
        if sample.action_mask.any():
            actions = chunk_actions(sample, c, k)[:, sample.action_mask]
            scores.action_mean_se.append(_se(mean_action[sample.action_mask].expand_as(actions), actions))
            scores.action_zero_se.append(_se(torch.zeros_like(actions), actions))
    return scores, _open_loop(sampler, sample, empty_text, rollout_chunks, scores)


def _one_chunk_ahead(sampler: WorldModelSampler, sample: EpisodeSample, empty_text: torch.Tensor,
                     video_se: list[float], action_se: list[float], draws: int = 1) -> None:
    """The one-chunk-ahead pass (module docstring): appends per chunk to video_se and action_se;
    each prediction is the mean of `draws` of the sampler's."""
    k = sampler.settings.chunk_size
    slots = sample.action_mask
    truth = lambda c: sample.latents[:, c * k:(c + 1) * k]  # noqa: E731
    start_episode(sampler, sample, empty_text)
    sampler.observe(0, latents=truth(0), actions=chunk_actions(sample, 0, k))
    for c in range(1, sample.latents.shape[1] // k):
        video_se.append(_se(_mean_of(draws, sampler, lambda: sampler.predict_video(c)), truth(c)))
        sampler.observe(c, latents=truth(c))
        actions = chunk_actions(sample, c, k)
        if slots.any():
            predicted = _mean_of(draws, sampler, lambda: sampler.predict_actions(c))
            action_se.append(_se(predicted[:, slots], actions[:, slots]))
        sampler.observe(c, actions=actions)


def _mean_of(draws: int, sampler: WorldModelSampler, predict) -> torch.Tensor:
    """The mean of `draws` predictions, each dropped from the cache again (on the CPU)."""
    total = None
    for _ in range(draws):
        prediction = predict().cpu().float()
        sampler.drop_predictions()
        total = prediction if total is None else total + prediction
    return total / draws


def _open_loop(sampler: WorldModelSampler, sample: EpisodeSample, empty_text: torch.Tensor, rollout_chunks: int,
               scores: EpisodeScores) -> torch.Tensor:
    k = sampler.settings.chunk_size
    truth = lambda c: sample.latents[:, c * k:(c + 1) * k]  # noqa: E731
    start_episode(sampler, sample, empty_text)
    sampler.observe(0, latents=truth(0), actions=chunk_actions(sample, 0, k))
    rollout = [truth(0)]
    last_seen = sample.latents[:, k - 1:k]
    for c in range(1, min(sample.latents.shape[1] // k, 1 + rollout_chunks)):
        imagined = sampler.predict_video(c).cpu()
        scores.rollout_se.append(_se(imagined, truth(c)))
        scores.rollout_copy_se.append(_se(last_seen.expand_as(truth(c)), truth(c)))
        sampler.drop_predictions()
        sampler.observe(c, latents=imagined, actions=chunk_actions(sample, c, k))
        rollout.append(imagined)
    return torch.cat(rollout, dim=1)

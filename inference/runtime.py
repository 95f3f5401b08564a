"""The chunked autoregressive control loop of spec 4: one episode at a time, one chunk per `infer`.

Chunk c covers latent frames [cK, (c+1)K) (absolute: positions keep counting across the episode);
its action group f leads from latent frame f-1 into f (spec 2.1). Per chunk:

  infer     video: denoise z_c from noise, attending to the cache, with classifier-free guidance,
                   down to the partial-denoising stop level; z_c is then cached as a prediction at
                   that level (its K/V are of the partially noisy latent at its non-zero t).
            actions (inverse dynamics): denoise a_c, attending to the cache, which now holds z_c;
                   a_c is cached as a prediction at t = 0 and returned in robot units.
  feedback  the chunk the robot finished: drop every predicted slot, cache its observed latents and
            its executed actions as ground truth at t = 0.

  imagine   image-to-video-action (the reference's i2va): reset, then n infers with no feedback, so
            every chunk builds on the predictions before it; -> the latents and actions of all n.

Synchronous clients (the reference RoboTwin/LIBERO ones) alternate infer and feedback. An
asynchronous client asks for chunk c+1 while the robot executes chunk c, so when the observation of
chunk c-1 arrives, chunk c is still in flight. Feedback then grounds the in-flight chunk with forward
dynamics (paper §3.4, Alg. 2): after the ground truth of chunk c-1, it adds the actions being executed
(a_c) transiently, re-imagines z_c from them (`fdm_steps` Euler steps of the video model that also
sees a_c, as the forward-dynamics training copy does), and caches z_c and then a_c as predictions;
the next infer predicts (z_{c+1}, a_{c+1}) on top. The next feedback drops all of it for the real
chunk c.

The denoising loops, the cache and its deferred writes are world_model.py's WorldModelSampler (the
latent-level API `lbva eval` uses too); this class adds cameras, prompts, robot units and the
bookkeeping of chunks in flight. A predicted write that feedback drops before any forward ran it
costs nothing (the predicted actions of a synchronous chunk). Noise: one generator per episode,
seeded with `settings.seed` at reset; per chunk the video noise, then the action noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lbva.models.mot import LingBotVA

from .batching import ForwardBatcher
from .observations import ActionCodec, ObservationEncoder, PromptEncoder
from .settings import InferenceSettings
from .world_model import WorldModelSampler


class EpisodeError(Exception):
    """A request that does not fit the episode's state or shapes (a client mistake, not a server bug)."""


@dataclass
class _InFlight:
    """A chunk handed to the robot and not yet fed back."""

    chunk: int
    actions: torch.Tensor  # [K*N, 30] normalised, as predicted


class InferenceRuntime:
    """One model serving one episode at a time: reset, then infer / feedback (module docstring)."""

    def __init__(
        self, model: LingBotVA, settings: InferenceSettings, *, codec: ActionCodec, cameras: ObservationEncoder,
        prompts: PromptEncoder, latent_size: tuple[int, int], actions_per_frame: int, shortcuts: bool = True,
        batcher: ForwardBatcher | None = None,
    ) -> None:
        """shortcuts, batcher: see WorldModelSampler (shortcuts False: the full forwards the equality
        tests compare with; a batcher: the server's, shared by its sessions)."""
        self.sampler = WorldModelSampler(model, settings, latent_size=latent_size,
                                         actions_per_frame=actions_per_frame, action_mask=codec.mask,
                                         shortcuts=shortcuts, batcher=batcher)
        self.model = self.sampler.model
        self.settings = settings
        self.codec = codec
        self.cameras = cameras
        self.prompts = prompts
        self.actions_per_frame = actions_per_frame
        self.device = self.sampler.device
        self.cache = self.sampler.cache
        self._in_flight: list[_InFlight] = []
        self._next_chunk = 0

    def new_session(self, batcher: ForwardBatcher | None = None) -> InferenceRuntime:
        """A runtime for another, concurrent episode: the same model weights, codec, prompt encoder and
        loaded camera encoder; its own KV cache, camera streams, noise generator and chunks in flight.
        batcher: the one the concurrent sessions share, so their forwards run batched (batching.py)."""
        return InferenceRuntime(self.model, self.settings, codec=self.codec, cameras=self.cameras.sibling(),
                                prompts=self.prompts, latent_size=self.sampler.latent_size,
                                actions_per_frame=self.actions_per_frame, shortcuts=self.sampler.shortcuts,
                                batcher=batcher)

    # --- episode interface -------------------------------------------------------------------

    def reset(self, prompt: str) -> None:
        """Start an episode: encode the prompt (and the negative prompt with CFG), empty the cache."""
        texts = [prompt, self.settings.negative_prompt] if self.settings.use_cfg else [prompt]
        self.sampler.start(self.prompts.encode(texts))
        self._in_flight = []
        self._next_chunk = 0

    def infer(self, observation: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Predict the next chunk; -> robot actions [C, K, N] float32.

        The first call of an episode needs `observation` with every camera image (H x W x 3 uint8);
        later calls ignore it, as the reference server does."""
        return self._predict_chunk(observation)[1]

    def imagine(self, observation: Mapping[str, np.ndarray], prompt: str, chunks: int
                ) -> tuple[torch.Tensor, np.ndarray]:
        """Image-to-video-action (the reference's i2va): a new episode from one observation and a prompt,
        then `chunks` infers with no feedback, each on top of the predictions before it (nothing is
        replaced by ground truth). -> (video latents [z, chunks*K, h, w], robot actions
        [chunks, C, K, N]); chunk 0 is what `infer` returns after the same reset. The episode stays
        open with every chunk in flight; the next reset discards it."""
        if chunks < 1:
            raise EpisodeError(f"imagine needs at least one chunk, got {chunks}")
        self.reset(prompt)
        predicted = [self._predict_chunk(observation) for _ in range(chunks)]
        latents = torch.cat([video for video, _ in predicted], dim=1)
        return latents, np.stack([actions for _, actions in predicted])

    def decode(self, latents: torch.Tensor) -> np.ndarray | None:
        """Imagined latents [z, F, h, w] -> frames [F, H, W, 3] uint8 of the tiled canvas, or None
        where the bundle's video codec cannot decode (the stand-in encoder)."""
        return self.cameras.decode(latents)

    def _predict_chunk(self, observation: Mapping[str, np.ndarray] | None) -> tuple[torch.Tensor, np.ndarray]:
        """The next chunk: (its latents [z, K, h, w] on the CPU, its robot actions [C, K, N]); see infer."""
        if not self.sampler.started:
            raise EpisodeError("no episode: send a reset with a prompt first")
        if self._next_chunk == 0:
            missing = [key for key in self.cameras.layout.keys if observation is None or key not in observation]
            if missing:
                raise EpisodeError(f"the first infer of an episode needs every camera image; missing {missing}")
            self.sampler.set_first_frame(self.cameras.start(observation))
        chunk = self._next_chunk
        video = self.sampler.predict_video(chunk)
        actions = self.sampler.predict_actions(chunk)
        self._in_flight.append(_InFlight(chunk, actions))
        self._next_chunk += 1
        return video.cpu(), self.codec.denormalize(actions, self.settings.chunk_size, self.actions_per_frame)

    def _check_keyframes(self, keyframes: Sequence[Mapping[str, np.ndarray]], chunk: int) -> None:
        """Every keyframe holds every camera as an [H, W, 3] image, one size per camera."""
        for key in self.cameras.layout.keys:
            shapes = set()
            for number, frame in enumerate(keyframes):
                image = frame.get(key) if isinstance(frame, Mapping) else None
                if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
                    raise EpisodeError(f"feedback for chunk {chunk}: keyframe {number} has no [H, W, 3] image "
                                       f"for camera '{key}'")
                shapes.add(image.shape)
            if len(shapes) > 1:
                raise EpisodeError(f"feedback for chunk {chunk}: camera '{key}' keyframes have different sizes "
                                   f"{sorted(shapes)}")

    def feedback(self, keyframes: Sequence[Mapping[str, np.ndarray]], executed: np.ndarray) -> None:
        """Ground the oldest chunk in flight: its observed keyframes (4 per latent frame with the Wan2.2
        VAE, oldest first; the first chunk's frame 0 is the first observation, so it takes 4(K-1)) and
        the actions executed [C, K, N] in robot units."""
        if not self.sampler.started or not self._in_flight:
            raise EpisodeError("no chunk awaits feedback: infer one first")
        done = self._in_flight[0]
        k = self.settings.chunk_size
        new_frames = k - 1 if done.chunk == 0 else k
        expected = self.cameras.temporal_factor * new_frames
        if len(keyframes) != expected:
            raise EpisodeError(f"feedback for chunk {done.chunk} needs {expected} keyframes "
                               f"({self.cameras.temporal_factor} per latent frame), got {len(keyframes)}")
        if executed.shape != (len(self.codec.channels), k, self.actions_per_frame):
            raise EpisodeError(f"state must be the executed actions [{len(self.codec.channels)}, {k}, "
                               f"{self.actions_per_frame}], got {list(executed.shape)}")
        self._check_keyframes(keyframes, done.chunk)
        # Nothing above changed the episode: refused feedback leaves the chunk in flight for a retry.
        self._in_flight.pop(0)
        self.sampler.drop_predictions()

        latents = self.cameras.extend(keyframes).to(self.device) if new_frames else None
        if done.chunk == 0:
            first = self.sampler.first_frame
            latents = first if latents is None else torch.cat([first, latents], dim=1)
        self.sampler.observe(done.chunk, latents=latents, actions=self.codec.normalize(executed))
        for flight in self._in_flight:
            # The actions being executed join the re-imagination transiently; once z_c is
            # re-imagined they are cached beside it, so their K/V see it as in training.
            self.sampler.reimagine_video(flight.chunk, flight.actions)

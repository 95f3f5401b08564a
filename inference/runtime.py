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

Synchronous clients (the reference RoboTwin/LIBERO ones) alternate infer and feedback. An
asynchronous client asks for chunk c+1 while the robot executes chunk c, so when the observation of
chunk c-1 arrives, chunk c is still in flight. Feedback then grounds the in-flight chunk with forward
dynamics (paper §3.4, Alg. 2): after the ground truth of chunk c-1, it adds the actions being executed
(a_c) transiently, re-imagines z_c from them (`fdm_steps` Euler steps of the video model that also
sees a_c, as the forward-dynamics training copy does), and caches z_c and then a_c as predictions;
the next infer predicts (z_{c+1}, a_{c+1}) on top. The next feedback drops all of it for the real
chunk c.

Deferred writes. A cache write that nothing needs yet (a finished prediction, observed ground truth)
is not run as its own forward: it rides along with the next forward as an extra token group, and the
training mask rule keeps the fused forward exact. A predicted write that feedback drops before any
forward ran it costs nothing (the predicted actions of a synchronous chunk).

Noise comes from one generator per episode, seeded with `settings.seed` at reset, drawn as the loops
run: per chunk the video noise [L_video, D] then the action noise [K*N, 30], in token order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lbva.models.masks import CLEAN, NOISY, NOISY_FDM
from lbva.models.mot import LingBotVA
from lbva.models.patching import action_positions, patchify, video_positions

from .cached_forward import CachedModel, TokenGroup
from .kv_cache import KVCache, WriteMode
from .observations import ActionCodec, ObservationEncoder, PromptEncoder
from .sampling import denoising_sigmas, euler_step, guided
from .settings import InferenceSettings


class EpisodeError(Exception):
    """A request that does not fit the episode's state or shapes (a client mistake, not a server bug)."""


@dataclass
class _InFlight:
    """A chunk handed to the robot and not yet fed back."""

    chunk: int
    actions: torch.Tensor  # [K*N, 30] normalised, as predicted


def output_to_input_order(tokens: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """The head's patch-major (p, c) features -> the input's channel-major (c, p) order."""
    volume = patch[0] * patch[1] * patch[2]
    return tokens.unflatten(-1, (volume, -1)).transpose(-1, -2).flatten(-2)


class InferenceRuntime:
    """One model serving one episode at a time: reset, then infer / feedback (module docstring)."""

    def __init__(
        self, model: LingBotVA, settings: InferenceSettings, *, codec: ActionCodec, cameras: ObservationEncoder,
        prompts: PromptEncoder, latent_size: tuple[int, int], actions_per_frame: int,
    ) -> None:
        settings.validate()
        config = model.config
        _, ph, pw = config.patch_size
        if latent_size[0] % ph or latent_size[1] % pw:
            raise ValueError(f"latent canvas {latent_size} is not a multiple of the patch {config.patch_size}")
        self.model = model.eval()
        self.settings = settings
        self.codec = codec
        self.cameras = cameras
        self.prompts = prompts
        self.actions_per_frame = actions_per_frame
        self.device = next(model.parameters()).device
        self.token_grid = (latent_size[0] // ph, latent_size[1] // pw)
        self.video_tokens_per_chunk = settings.chunk_size * self.token_grid[0] * self.token_grid[1]
        self.action_tokens_per_chunk = settings.chunk_size * actions_per_frame
        window_chunks = settings.attention_window // 2
        self.cache = KVCache(
            config.num_layers, window_chunks * (self.video_tokens_per_chunk + self.action_tokens_per_chunk),
            batch=2 if settings.use_cfg else 1, num_heads=config.num_heads, head_dim=config.head_dim,
            dtype=next(model.parameters()).dtype, device=self.device,
        )
        self._action_mask = codec.mask.to(self.device)
        self._cached: CachedModel | None = None
        self._generator = torch.Generator()
        self._pending: list[TokenGroup] = []
        self._in_flight: list[_InFlight] = []
        self._next_chunk = 0
        self._first_latent: torch.Tensor | None = None  # [z, 1, h, w]

    # --- episode interface -------------------------------------------------------------------

    def reset(self, prompt: str) -> None:
        """Start an episode: encode the prompt (and the negative prompt with CFG), empty the cache."""
        texts = [prompt, self.settings.negative_prompt] if self.settings.use_cfg else [prompt]
        text = self.prompts.encode(texts).to(self.device)
        self.cache.clear()
        self._cached = CachedModel(self.model, self.cache, text)
        self._generator.manual_seed(self.settings.seed)
        self._pending, self._in_flight = [], []
        self._next_chunk = 0
        self._first_latent = None

    def infer(self, observation: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Predict the next chunk; -> robot actions [C, K, N] float32.

        The first call of an episode needs `observation` with every camera image (H x W x 3 uint8);
        later calls ignore it, as the reference server does."""
        if self._cached is None:
            raise EpisodeError("no episode: send a reset with a prompt first")
        if self._next_chunk == 0:
            missing = [key for key in self.cameras.layout.keys if observation is None or key not in observation]
            if missing:
                raise EpisodeError(f"the first infer of an episode needs every camera image; missing {missing}")
            self._first_latent = self.cameras.start(observation).to(self.device)
        chunk = self._next_chunk
        self._denoise_video(chunk, self.settings.video_steps, NOISY)
        actions = self._denoise_actions(chunk)
        self._in_flight.append(_InFlight(chunk, actions))
        self._next_chunk += 1
        return self.codec.denormalize(actions, self.settings.chunk_size, self.actions_per_frame)

    def feedback(self, keyframes: Sequence[Mapping[str, np.ndarray]], executed: np.ndarray) -> None:
        """Ground the oldest chunk in flight: its observed keyframes (4 per latent frame with the Wan2.2
        VAE, oldest first; the first chunk's frame 0 is the first observation, so it takes 4(K-1)) and
        the actions executed [C, K, N] in robot units."""
        if self._cached is None or not self._in_flight:
            raise EpisodeError("no chunk awaits feedback: infer one first")
        done = self._in_flight[0]
        k, n = self.settings.chunk_size, self.actions_per_frame
        new_frames = k - 1 if done.chunk == 0 else k
        expected = self.cameras.temporal_factor * new_frames
        if len(keyframes) != expected:
            raise EpisodeError(f"feedback for chunk {done.chunk} needs {expected} keyframes "
                               f"({self.cameras.temporal_factor} per latent frame), got {len(keyframes)}")
        if executed.shape != (len(self.codec.channels), k, n):
            raise EpisodeError(f"state must be the executed actions [{len(self.codec.channels)}, {k}, {n}], "
                               f"got {list(executed.shape)}")
        self._in_flight.pop(0)
        self.cache.clear_predicted()
        self._pending = [g for g in self._pending if g.write == WriteMode.GROUND_TRUTH]

        latents = self.cameras.extend(keyframes).to(self.device) if new_frames else None
        if done.chunk == 0:
            latents = self._first_latent if latents is None else torch.cat([self._first_latent, latents], dim=1)
        actions = self.codec.normalize(executed).to(self.device)
        if done.chunk == 0:
            actions[:n] = 0.0  # latent frame 0 has a dummy action group, zero as in training
        self._pending += [
            self._video_group(done.chunk, self._latent_tokens(latents), 0.0, CLEAN, WriteMode.GROUND_TRUTH),
            self._action_group(done.chunk, actions, 0.0, CLEAN, WriteMode.GROUND_TRUTH),
        ]
        for flight in self._in_flight:
            # The actions being executed join the re-imagination transiently (update_cache 0); once
            # z_c is re-imagined they are cached beside it, so their K/V see it as in training.
            executing = self._action_group(flight.chunk, flight.actions, 0.0, CLEAN, WriteMode.TRANSIENT)
            self._denoise_video(flight.chunk, self.settings.fdm_steps, NOISY_FDM, context=[executing])
            self._pending.append(self._action_group(flight.chunk, flight.actions, 0.0, CLEAN, WriteMode.PREDICTED))

    # --- denoising loops -----------------------------------------------------------------------

    def _denoise_video(self, chunk: int, steps: int, role: int, context: Sequence[TokenGroup] = ()) -> torch.Tensor:
        """Denoise the video of `chunk` down to the stop level and leave its cache write pending.
        `context`: transient groups every step attends to (the executing actions of the FDM pass)."""
        s = self.settings
        sigmas = denoising_sigmas(steps, s.video_shift, s.video_stop_sigma).tolist()
        dim = self.model.config.video_token_dim
        x = torch.randn(self.video_tokens_per_chunk, dim, generator=self._generator).to(self.device)
        first = self._first_frame_tokens(chunk)
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            x = self._pin_first_frame(x, first)
            group = self._video_group(chunk, x, sigma, role, WriteMode.TRANSIENT)
            prediction = guided(self._forward(group, context), s.video_guidance)
            x = euler_step(x, output_to_input_order(prediction, self.model.config.patch_size), sigma, sigma_next)
        x = self._pin_first_frame(x, first)
        self._pending.append(self._video_group(chunk, x, sigmas[-1], CLEAN, WriteMode.PREDICTED))
        return x

    def _denoise_actions(self, chunk: int) -> torch.Tensor:
        """Inverse dynamics: denoise the actions of `chunk` fully; its cache write stays pending."""
        s = self.settings
        sigmas = denoising_sigmas(s.action_steps, s.action_shift).tolist()
        x = torch.randn(self.action_tokens_per_chunk, self.model.config.action_dim, generator=self._generator)
        x = self._clean_actions(x.to(self.device), chunk)
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            group = self._action_group(chunk, x, sigma, NOISY, WriteMode.TRANSIENT)
            x = euler_step(x, guided(self._forward(group), s.action_guidance), sigma, sigma_next)
            x = self._clean_actions(x, chunk)
        self._pending.append(self._action_group(chunk, x, 0.0, CLEAN, WriteMode.PREDICTED))
        return x

    def _forward(self, group: TokenGroup, context: Sequence[TokenGroup] = ()) -> torch.Tensor:
        """One model forward of `group` (plus `context`), carrying the pending writes along;
        -> the prediction for `group` [B, L, D]."""
        groups, self._pending = self._pending + list(context) + [group], []
        return self._cached.forward(groups)[-1]

    # --- token groups ------------------------------------------------------------------------------

    def _video_group(self, chunk: int, tokens: torch.Tensor, sigma: float, role: int, write: WriteMode) -> TokenGroup:
        k = self.settings.chunk_size
        timesteps = torch.full((tokens.shape[0],), sigma * 1000.0, device=self.device)
        if chunk == 0:
            timesteps[: self._frame_tokens] = 0.0  # the observed first frame is clean (i2v conditioning)
        positions = video_positions(k, *self.token_grid, frame_offset=chunk * k).to(self.device)
        return TokenGroup("video", chunk, role, tokens, timesteps, positions, write)

    def _action_group(self, chunk: int, tokens: torch.Tensor, sigma: float, role: int, write: WriteMode) -> TokenGroup:
        k, n = self.settings.chunk_size, self.actions_per_frame
        timesteps = torch.full((tokens.shape[0],), sigma * 1000.0, device=self.device)
        if chunk == 0:
            timesteps[:n] = 0.0  # the dummy group of latent frame 0 is a clean zero
        positions = action_positions(k, n, frame_offset=chunk * k).to(self.device)
        return TokenGroup("action", chunk, role, tokens, timesteps, positions, write)

    @property
    def _frame_tokens(self) -> int:
        return self.token_grid[0] * self.token_grid[1]

    def _latent_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """[z, F, h, w] -> [F*h'*w', z*pt*ph*pw] channel-major tokens."""
        return patchify(latents[None].float(), self.model.config.patch_size)[0]

    def _first_frame_tokens(self, chunk: int) -> torch.Tensor | None:
        if chunk != 0:
            return None
        return self._latent_tokens(self._first_latent)

    @staticmethod
    def _pin_first_frame(x: torch.Tensor, first: torch.Tensor | None) -> torch.Tensor:
        if first is None:
            return x
        return torch.cat([first.to(x.dtype), x[first.shape[0]:]])

    def _clean_actions(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        """Unused slots are zero in every input; the first chunk's frame-0 group is a zero dummy."""
        x = x * self._action_mask
        if chunk == 0:
            x[: self.actions_per_frame] = 0.0
        return x

"""The world model's sampling API at the latent level: one episode's KV cache, and the three
predictions of spec 4 that everything built on the model asks for:

    predict_video(chunk)     imagine the latents of `chunk` from what the cache holds (history)
    predict_actions(chunk)   inverse dynamics: the actions of `chunk` from the video the cache holds
    reimagine_video(chunk, actions)
                             forward dynamics: the latents of `chunk` given the actions executed in it
    observe(chunk, latents=..., actions=...)
                             cache ground truth (observed latents, executed actions) at t = 0

Latents are normalised VAE latents [z, F, h, w]; actions are normalised tokens [K*N, 30] in the
prepared data's units. The robot-facing runtime (runtime.py: cameras, prompts, robot units,
asynchronous chunks) and `lbva eval` (offline next-chunk prediction, open-loop rollouts and
inverse dynamics on held-out episodes) both drive this class; neither has a sampling loop of its own.

Chunk c covers latent frames [cK, (c+1)K) (absolute: positions keep counting across the episode);
its action group f leads from latent frame f-1 into f (spec 2.1). Chunk 0's frame 0 is the observed
first frame (`set_first_frame`), pinned clean in every video loop of chunk 0.

Deferred writes: a cache write that nothing needs yet (a finished prediction, observed ground truth)
is not run as its own forward; it rides along with the next forward as an extra token group, and the
training mask rule keeps the fused forward exact. `drop_predictions` forgets every predicted slot and
predicted write, so a prediction that ground truth replaces costs no forward.

Noise comes from one generator per episode, seeded with `settings.seed` at `start`, drawn as the
loops run: per video loop [K*h'*w', D], per action loop [K*N, 30], in token order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lbva.models.masks import CLEAN, NOISY, NOISY_FDM
from lbva.models.mot import LingBotVA
from lbva.models.patching import action_positions, input_to_output_order, patchify, unpatchify, video_positions

from .batching import ForwardBatcher
from .cached_forward import CachedModel, TokenGroup
from .kv_cache import KVCache, WriteMode
from .sampling import denoising_sigmas, euler_step, guided
from .settings import InferenceSettings


def output_to_input_order(tokens: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """The head's patch-major (p, c) features -> the input's channel-major (c, p) order."""
    volume = patch[0] * patch[1] * patch[2]
    return tokens.unflatten(-1, (volume, -1)).transpose(-1, -2).flatten(-2)


class WorldModelSampler:
    """One model sampling one episode at a time (module docstring). latent_size: the latent
    canvas (h, w); actions_per_frame: N; action_mask [30] bool: the slots the embodiment fills."""

    def __init__(self, model: LingBotVA, settings: InferenceSettings, *, latent_size: tuple[int, int],
                 actions_per_frame: int, action_mask: torch.Tensor, shortcuts: bool = True,
                 batcher: ForwardBatcher | None = None) -> None:
        """shortcuts: the savings that leave the numbers as they are (the prompt's work and each
        noise level's conditioning once per episode, the prompt row alone in an unguided action loop); False runs every forward in full,
        the baseline the equality tests and bench/inference_latency.py compare with.
        batcher: shared by the sessions of a server, so their concurrent forwards share model calls
        (batching.py); None runs each forward alone."""
        settings.validate()
        config = model.config
        _, ph, pw = config.patch_size
        if latent_size[0] % ph or latent_size[1] % pw:
            raise ValueError(f"latent canvas {latent_size} is not a multiple of the patch {config.patch_size}")
        self.model = model.eval()
        self.settings = settings
        self.latent_size = latent_size
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
        self.shortcuts = shortcuts
        # With the shortcuts: the prompt's padding folded into one key (cached_forward.EpisodeText),
        # equal to the unfolded softmax within rounding, not bit for bit.
        self.fold_padding = True
        self.batcher = batcher
        self._action_mask = action_mask.to(self.device)
        self._cached: CachedModel | None = None
        self._generator = torch.Generator()
        self._pending: list[TokenGroup] = []
        self._first_latent: torch.Tensor | None = None  # [z, 1, h, w]

    # --- episode -----------------------------------------------------------------------------

    def start(self, text: torch.Tensor) -> None:
        """Start an episode with the text embeddings [B, T, D] (row 0 the prompt, row 1 the negative
        prompt under CFG): empty cache, noise generator reseeded."""
        rows = 2 if self.settings.use_cfg else 1
        if text.shape[0] != rows:
            raise ValueError(f"text has {text.shape[0]} rows, the settings need {rows} "
                             "(prompt, and the negative prompt under classifier-free guidance)")
        self.cache.clear()
        self._cached = CachedModel(self.model, self.cache, text.to(self.device), reuse_prompt=self.shortcuts,
                                   fold_padding=self.fold_padding)
        self._generator.manual_seed(self.settings.seed)
        self._pending = []
        self._first_latent = None

    @property
    def started(self) -> bool:
        return self._cached is not None

    @property
    def first_frame(self) -> torch.Tensor | None:
        """The observed first latent frame [z, 1, h, w] of this episode (None before it is set)."""
        return self._first_latent

    def set_first_frame(self, latent: torch.Tensor) -> None:
        """The observed first latent frame [z, 1, h, w], the clean frame 0 of chunk 0."""
        self._first_latent = latent.to(self.device)

    def observe(self, chunk: int, *, latents: torch.Tensor | None = None, actions: torch.Tensor | None = None) -> None:
        """Cache ground truth of `chunk` at t = 0: its latents [z, K, h, w] (chunk 0: frame 0
        included) and/or its actions [K*N, 30] normalised (chunk 0's frame-0 group is zeroed)."""
        if latents is not None:
            self._pending.append(self._video_group(chunk, self._latent_tokens(latents), 0.0, CLEAN,
                                                   WriteMode.GROUND_TRUTH))
        if actions is not None:
            actions = actions.to(self.device).clone()
            if chunk == 0:
                actions[: self.actions_per_frame] = 0.0  # latent frame 0 has a dummy action group
            self._pending.append(self._action_group(chunk, actions, 0.0, CLEAN, WriteMode.GROUND_TRUTH))

    def drop_predictions(self) -> None:
        """Forget every predicted cache slot and every predicted write not yet run."""
        self.cache.clear_predicted()
        self._pending = [g for g in self._pending if g.write == WriteMode.GROUND_TRUTH]

    # --- predictions ---------------------------------------------------------------------------

    def predict_video(self, chunk: int, steps: int | None = None) -> torch.Tensor:
        """Imagine the latents of `chunk` [z, K, h, w] from the cache; the prediction is cached (as
        predicted, at the partial-denoising stop level) with the next forward."""
        tokens = self._denoise_video(chunk, steps or self.settings.video_steps, NOISY)
        return self.latents_of(tokens)

    def reimagine_video(self, chunk: int, actions: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """Forward dynamics: the latents of `chunk` [z, K, h, w] given the actions [K*N, 30] being
        executed in it (transient context); then those actions are cached beside it as predicted."""
        executing = self._action_group(chunk, actions, 0.0, CLEAN, WriteMode.TRANSIENT)
        tokens = self._denoise_video(chunk, steps or self.settings.fdm_steps, NOISY_FDM, context=[executing])
        self._pending.append(self._action_group(chunk, actions, 0.0, CLEAN, WriteMode.PREDICTED))
        return self.latents_of(tokens)

    def predict_actions(self, chunk: int) -> torch.Tensor:
        """Inverse dynamics: denoise the actions of `chunk` fully from the cache (which should hold
        its video); -> [K*N, 30] normalised, cached as predicted with the next forward."""
        s = self.settings
        sigmas = denoising_sigmas(s.action_steps, s.action_shift).tolist()
        x = torch.randn(self.action_tokens_per_chunk, self.model.config.action_dim, generator=self._generator)
        x = self._clean_actions(x.to(self.device), chunk)
        # Unguided, the loop reads the prompt row only (guided() takes row 0), so the negative one is skipped.
        rows = 1 if self.shortcuts and s.action_guidance == 1.0 else None
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            group = self._action_group(chunk, x, sigma, NOISY, WriteMode.TRANSIENT)
            x = euler_step(x, guided(self._forward(group, rows=rows), s.action_guidance), sigma, sigma_next)
            x = self._clean_actions(x, chunk)
        self._pending.append(self._action_group(chunk, x, 0.0, CLEAN, WriteMode.PREDICTED))
        return x

    def latents_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """Channel-major video tokens of one chunk [K*h'*w', D] -> latents [z, K, h, w]."""
        patch = self.model.config.patch_size
        grid = (self.settings.chunk_size // patch[0], *self.token_grid)
        return unpatchify(input_to_output_order(tokens[None].float(), patch), grid, patch)[0]

    # --- loops and groups --------------------------------------------------------------------

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

    def _forward(self, group: TokenGroup, context: Sequence[TokenGroup] = (), rows: int | None = None
                 ) -> torch.Tensor:
        """One model forward of `group` (plus `context`), carrying the pending writes along;
        -> the prediction for `group` [B, L, D]. rows: the CFG rows wanted (default all); a forward
        carrying pending writes runs every row, since every row of the cache must hold them."""
        if self._cached is None:
            raise RuntimeError("no episode: call start() first")
        if self._pending:
            rows = None
        groups, self._pending = self._pending + list(context) + [group], []
        if self.batcher is not None:
            return self.batcher.forward(self._cached, groups, rows)[-1]
        return self._cached.forward(groups, rows)[-1]

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
        return patchify(latents[None].float().to(self.device), self.model.config.patch_size)[0]

    def _first_frame_tokens(self, chunk: int) -> torch.Tensor | None:
        if chunk != 0:
            return None
        if self._first_latent is None:
            raise RuntimeError("chunk 0 needs the observed first frame: call set_first_frame() first")
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

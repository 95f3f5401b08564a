"""Builders for the inference tests, and a cache-free reference of the control loop.

`CacheFreeLoop` runs the loop of spec 4 the slow, obvious way: every model call is one masked
sequence holding the whole history (the clean tokens so far) plus the tokens being denoised, with
the training mask rule and SDPA, and no KV cache. The runtime must give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lbva.inference.bundle import BundleSpec
from lbva.inference.observations import ActionCodec, CameraLayout, ObservationEncoder, PromptEncoder
from lbva.inference.runtime import InferenceRuntime
from lbva.inference.settings import InferenceSettings
from lbva.models.action_space import ActionStats
from lbva.models.attention import AttentionKernels, sdpa_kernel
from lbva.models.config import get_preset
from lbva.models.encoders import EncoderChoice
from lbva.models.masks import CLEAN, TokenLayout, dense_self_attention_mask
from lbva.models.mot import LingBotVA, ModelInputs
from lbva.models.patching import action_positions, patchify, video_positions
from lbva.models.standin_encoders import StandInTextEncoder, StandInVideoEncoder
from lbva.models.tiling import make_tiling

CAMERAS = ("observation.images.top", "observation.images.wrist")
IMAGE = 64  # pixels per side: a 4 x 4 latent per camera, 4 x 8 tiled, 2 x 4 = 8 tokens per frame
CHUNK = 2  # K
STEPS_PER_FRAME = 4  # N
TEXT_TOKENS = 8
CHANNELS = (0, 1)
PROMPT = "push the red block"
FAST = dict(chunk_size=CHUNK, video_steps=3, action_steps=4)


def stats() -> ActionStats:
    q01, q99 = np.zeros(30), np.zeros(30)
    q01[list(CHANNELS)], q99[list(CHANNELS)] = [-0.5, 0.0], [0.5, 2.0]
    return ActionStats(q01, q99)


def tiny_model(preset: str = "tiny-mot", seed: int = 0) -> LingBotVA:
    torch.manual_seed(seed)
    return LingBotVA(get_preset(preset)).eval()


def bundle_spec(model: LingBotVA, **settings) -> BundleSpec:
    return BundleSpec(
        cameras=CameraLayout(CAMERAS, make_tiling("side_by_side", len(CAMERAS), [IMAGE], [IMAGE])),
        action_channels=CHANNELS, actions_per_frame=STEPS_PER_FRAME, stats=stats(),
        encoders=EncoderChoice("standin", standin_text_dim=model.config.text_dim), text_tokens=TEXT_TOKENS,
        defaults=InferenceSettings(**{**FAST, **settings}),
    )


def runtime(model: LingBotVA, **settings) -> InferenceRuntime:
    spec = bundle_spec(model, **settings)
    encoders = spec.encoders
    return InferenceRuntime(
        model, spec.defaults, codec=ActionCodec(CHANNELS, spec.stats),
        cameras=ObservationEncoder(spec.cameras, encoders, "cpu"), prompts=PromptEncoder(encoders, TEXT_TOKENS, "cpu"),
        latent_size=spec.cameras.tiling.canvas_size(16), actions_per_frame=STEPS_PER_FRAME,
    )


def observation(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {key: rng.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8) for key in CAMERAS}


def keyframes(rng: np.random.Generator, chunk: int) -> list[dict[str, np.ndarray]]:
    """The keyframes a client sends after executing `chunk`: 4 per new latent frame."""
    return [observation(rng) for _ in range(4 * (CHUNK - 1 if chunk == 0 else CHUNK))]


# --- the cache-free reference ---------------------------------------------------------------------

def tiled_latents(frames: list[dict[str, np.ndarray]]) -> torch.Tensor:
    """Stand-in latents of 1 + 4k frames per camera, tiled along width: [48, 1 + k, 4, 8]."""
    encoder = StandInVideoEncoder()
    return torch.cat([encoder.encode(np.stack([f[key] for f in frames])) for key in CAMERAS], dim=-1)


def tokens_of(latents: torch.Tensor) -> torch.Tensor:
    return patchify(latents[None], (1, 2, 2))[0]


def reference_sigmas(steps: int, shift: float) -> list[float]:
    """The full inference schedule written out: shifted linspace(1, 0, steps + 1)."""
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * s / (1 + (shift - 1) * s)).float().tolist()


@dataclass
class Segment:
    modality: str
    chunk: int
    role: int
    tokens: torch.Tensor
    sigma: float
    ground_truth: bool = False


@dataclass
class CacheFreeLoop:
    model: LingBotVA
    prompt: str
    settings: InferenceSettings
    generator: torch.Generator = field(init=False)
    history: list[Segment] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.settings.seed)
        encoder = StandInTextEncoder(self.model.config.text_dim, TEXT_TOKENS)
        texts = [self.prompt, self.settings.negative_prompt] if self.settings.use_cfg else [self.prompt]
        self.text = torch.stack([encoder.encode(t) for t in texts])
        self.mask = torch.zeros(30, dtype=torch.bool)
        self.mask[list(CHANNELS)] = True

    def _timesteps(self, seg: Segment) -> torch.Tensor:
        t = torch.full((seg.tokens.shape[0],), seg.sigma * 1000.0)
        if seg.chunk == 0:  # the first frame / the dummy action group is clean
            t[: 8 if seg.modality == "video" else STEPS_PER_FRAME] = 0.0
        return t

    def forward(self, current: Segment, context: list[Segment] = ()) -> torch.Tensor:
        """The whole history, `context` and `current` as one masked sequence -> current's prediction."""
        segments = self.history + list(context) + [current]
        video = [s for s in segments if s.modality == "video"]
        action = [s for s in segments if s.modality == "action"]
        ordered = video + action
        chunk_id = torch.cat([torch.full((len(s.tokens),), 2 * s.chunk + (s.modality == "action")) for s in ordered])
        role = torch.cat([torch.full((len(s.tokens),), s.role) for s in ordered])
        layout = TokenLayout(torch.zeros_like(chunk_id)[None], chunk_id[None], role[None], window=10**6)
        mask = dense_self_attention_mask(layout)
        b = self.text.shape[0]

        def cat(parts, fn, width):
            out = torch.cat([fn(s) for s in parts]) if parts else torch.zeros(0, width)
            return out.expand(b, *out.shape)

        inputs = ModelInputs(
            video_tokens=cat(video, lambda s: s.tokens, 192),
            video_timesteps=cat(video, self._timesteps, None) if video else torch.zeros(b, 0),
            video_positions=cat(video, lambda s: video_positions(CHUNK, 2, 4, s.chunk * CHUNK), 3),
            action_tokens=cat(action, lambda s: s.tokens, 30),
            action_timesteps=cat(action, self._timesteps, None) if action else torch.zeros(b, 0),
            action_positions=cat(action, lambda s: action_positions(CHUNK, STEPS_PER_FRAME, s.chunk * CHUNK), 3),
            text=self.text,
        )
        with torch.no_grad():
            video_out, action_out = self.model(inputs, AttentionKernels(sdpa_kernel(mask), sdpa_kernel(None)))
        if current.modality == "video":
            return video_out[:, -len(current.tokens):]
        return action_out[:, -len(current.tokens):]

    @staticmethod
    def _guided(prediction: torch.Tensor, scale: float) -> torch.Tensor:
        if prediction.shape[0] == 1 or scale == 1.0:
            return prediction[0]
        return prediction[1] + scale * (prediction[0] - prediction[1])

    def video(self, chunk: int, role: int, steps: int, stop_index: int | None = None,
              first: torch.Tensor | None = None, context: list[Segment] = ()) -> torch.Tensor:
        """Euler down the schedule (to entry `stop_index`, default the end); the result joins the history."""
        sigmas = reference_sigmas(steps, self.settings.video_shift)
        sigmas = sigmas[: (stop_index if stop_index is not None else steps) + 1]
        x = torch.randn(16, 192, generator=self.generator)
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            if first is not None:
                x[:8] = first
            prediction = self.forward(Segment("video", chunk, role, x, sigma), context)
            velocity = self._guided(prediction, self.settings.video_guidance)
            # head order (p, c) -> input order (c, p)
            x = x + velocity.unflatten(-1, (4, 48)).transpose(-1, -2).flatten(-2) * (sigma_next - sigma)
        if first is not None:
            x[:8] = first
        self.history.append(Segment("video", chunk, CLEAN, x, sigmas[-1]))
        return x

    def actions(self, chunk: int) -> torch.Tensor:
        sigmas = reference_sigmas(self.settings.action_steps, self.settings.action_shift)
        x = torch.randn(CHUNK * STEPS_PER_FRAME, 30, generator=self.generator) * self.mask
        if chunk == 0:
            x[:STEPS_PER_FRAME] = 0
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            velocity = self._guided(self.forward(Segment("action", chunk, 1, x, sigma)), self.settings.action_guidance)
            x = (x + velocity * (sigma_next - sigma)) * self.mask
            if chunk == 0:
                x[:STEPS_PER_FRAME] = 0
        self.history.append(Segment("action", chunk, CLEAN, x, 0.0))
        return x

    def ground_truth(self, chunk: int, video_tokens: torch.Tensor, executed: np.ndarray) -> None:
        """Drop the predictions, add the observed chunk (actions normalised as in training)."""
        self.history = [s for s in self.history if s.ground_truth]
        full = np.zeros((CHUNK, STEPS_PER_FRAME, 30))
        full[..., list(CHANNELS)] = np.transpose(executed, (1, 2, 0))
        normalized = torch.from_numpy(stats().normalize(full, self.mask.numpy()).astype(np.float32)).flatten(0, 1)
        if chunk == 0:
            normalized[:STEPS_PER_FRAME] = 0
        self.history += [Segment("video", chunk, CLEAN, video_tokens, 0.0, True),
                         Segment("action", chunk, CLEAN, normalized, 0.0, True)]

    def predicted_actions(self, chunk: int, tokens: torch.Tensor) -> None:
        self.history.append(Segment("action", chunk, CLEAN, tokens, 0.0))


def denormalize(tokens: torch.Tensor) -> np.ndarray:
    return ActionCodec(CHANNELS, stats()).denormalize(tokens, CHUNK, STEPS_PER_FRAME)


def tiny_bundle(folder):
    """An inference bundle of the seed-0 tiny-mot model (what a test server serves) in `folder`."""
    from lbva.checkpoints_tools.export import write_weights_checkpoint
    from lbva.inference.bundle import export_inference_bundle

    model = tiny_model()
    checkpoint = write_weights_checkpoint(model, folder / "checkpoint", "tiny-mot", "test")
    return export_inference_bundle(checkpoint, folder / "bundle", bundle_spec(model))


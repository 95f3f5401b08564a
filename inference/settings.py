"""Settings of the inference loop and the server's default port, free of heavy imports (the CLI
builds its flags from them without loading torch or websockets)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PORT = 29536  # the reference config's default


@dataclass
class InferenceSettings:
    """Sampling settings of the loop; the bundle stores defaults, `lbva serve` may override them."""

    chunk_size: int = 4  # K latent frames per chunk
    attention_window: int = 30  # in chunk-id units, as in training: the cache holds window // 2 chunks
    video_steps: int = 5
    action_steps: int = 10
    video_shift: float = 5.0
    action_shift: float = 1.0
    video_guidance: float = 5.0
    action_guidance: float = 1.0
    video_stop_sigma: float = 0.0  # partial denoising: cache z at this noise level; 0 = full denoising
    fdm_steps: int = 1  # Euler steps of the forward-dynamics re-imagination (asynchronous clients)
    negative_prompt: str = ""
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        for name in ("chunk_size", "video_steps", "action_steps", "fdm_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.attention_window < 2:
            raise ValueError(f"attention_window must be >= 2 (one chunk), got {self.attention_window}")
        if self.video_shift <= 0 or self.action_shift <= 0:
            raise ValueError("video_shift and action_shift must be > 0")
        if self.video_guidance < 1 or self.action_guidance < 1:
            raise ValueError("guidance scales must be >= 1 (1 = no guidance)")
        if not 0.0 <= self.video_stop_sigma < 1.0:
            raise ValueError(f"video_stop_sigma must lie in [0, 1), got {self.video_stop_sigma}")

    @property
    def use_cfg(self) -> bool:
        return self.video_guidance > 1 or self.action_guidance > 1

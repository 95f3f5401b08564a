"""Model shapes and the named presets (`lbva model-info PRESET`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Layout = Literal["mot", "shared"]


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of a LingBot-VA model.

    layout "mot": the paper's Mixture-of-Transformers, a video stream and a narrower action stream
    of the same depth joined by one joint self-attention per layer.
    layout "shared": the released checkpoint's single 3072-wide stack used by both modalities.
    """

    layout: Layout
    num_layers: int = 30
    num_heads: int = 24
    head_dim: int = 128
    video_ffn_dim: int = 14336
    # Action stream (layout "mot" only): its own width, FFN and I/O MLPs; its q/k/v project into
    # the video's head space (num_heads x head_dim) so both modalities share one softmax.
    action_width: int = 768
    action_ffn_dim: int = 3072
    action_io_hidden: int = 256
    in_channels: int = 48
    patch_size: tuple[int, int, int] = (1, 2, 2)
    action_dim: int = 30
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def video_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def attention_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def patch_volume(self) -> int:
        pt, ph, pw = self.patch_size
        return pt * ph * pw

    @property
    def video_token_dim(self) -> int:
        """Width of one patchified video token: in_channels x patch volume (192 for Wan2.2-5B)."""
        return self.in_channels * self.patch_volume

    @property
    def dual_stream(self) -> bool:
        """Whether the action tokens run through their own stream (layout "mot") rather than through
        the video stream's blocks (layout "shared"). The one question every part that depends on
        the layout asks; models/mot.py builds the stream-specific parts from it."""
        return self.layout == "mot"

    @property
    def stream_width(self) -> int:
        """Residual width of the action stream."""
        return self.action_width if self.dual_stream else self.video_width

    def validate(self) -> None:
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim {self.head_dim} must be even and >= 6 for 3D RoPE")
        if self.dual_stream and self.video_width % self.action_width:
            raise ValueError(
                f"action_width {self.action_width} must divide the video width {self.video_width}"
            )
        # A stream narrower than its output cannot reach every direction of the velocity it
        # predicts: Linear(width -> token_dim) has rank <= width, and the unreachable share of the
        # unit-variance noise is a floor under the loss (a 128-wide video stream over 192-d tokens
        # cannot go below ~1/3 however long it trains).
        if self.video_width < self.video_token_dim:
            raise ValueError(
                f"video width num_heads x head_dim = {self.num_heads} x {self.head_dim} = {self.video_width} is "
                f"narrower than a video token (in_channels {self.in_channels} x patch {self.patch_volume} = "
                f"{self.video_token_dim}): its output layer could not reach "
                f"{self.video_token_dim - self.video_width} of the velocity's directions; widen num_heads or head_dim"
            )
        narrowest_action = min(self.stream_width, self.action_io_hidden) if self.dual_stream else self.stream_width
        if narrowest_action < self.action_dim:
            raise ValueError(
                f"the action stream's output path narrows to {narrowest_action} (action_width, action_io_hidden), "
                f"below action_dim {self.action_dim}: it could not reach every action channel"
            )


_FIVE_B = dict(num_layers=30, num_heads=24, head_dim=128, video_ffn_dim=14336, text_dim=4096, freq_dim=256)
# Test sizes: 4 heads x 48 = 192 is the narrowest video width that carries a 192-d video token, and
# head_dim 48 splits into the reference RoPE's (frame, row, col) parts 16 + 16 + 16.
_TINY = dict(
    num_layers=2, num_heads=4, head_dim=48, video_ffn_dim=128, action_width=32, action_ffn_dim=64,
    action_io_hidden=32, text_dim=32, freq_dim=32,
)

PRESETS: dict[str, ModelConfig] = {
    "lingbot-va-5b-mot": ModelConfig(layout="mot", **_FIVE_B),
    "lingbot-va-shared": ModelConfig(layout="shared", **_FIVE_B),
    # The demo preset: small enough to train in minutes on 2 CPU cores, and 256 wide, so its video
    # head can reach every direction of a 192-d video token (see ModelConfig.validate).
    "demo-mot": ModelConfig(
        layout="mot", num_layers=4, num_heads=4, head_dim=64, video_ffn_dim=512, action_width=64,
        action_ffn_dim=256, action_io_hidden=64, text_dim=32, freq_dim=64,
    ),
    "tiny-mot": ModelConfig(layout="mot", **_TINY),
    "tiny-shared": ModelConfig(layout="shared", **_TINY),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """The preset called `name`, with field overrides; KeyError lists the known presets."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset '{name}'; known presets: {', '.join(PRESETS)}")
    config = replace(PRESETS[name], **overrides)
    config.validate()
    return config

"""3D RoPE over explicit grid ids, and the token orders of spec 2.1-2.2."""

import torch

from lbva.models.patching import action_positions, input_to_output_order, patchify, unpatchify, video_positions
from lbva.models.rope import RotaryEmbedding3D, apply_rotary, rope_axis_dims


def test_head_dim_128_splits_44_42_42():
    assert rope_axis_dims(128) == (44, 42, 42)


def test_rotation_preserves_norms_and_is_identity_at_the_origin():
    rope = RotaryEmbedding3D(32)
    x = torch.randn(1, 3, 2, 32)
    positions = torch.tensor([[[0.0, 0.0, 0.0], [3.0, 1.0, 2.0], [7.5, -1.0, -1.0]]])
    rotated = apply_rotary(x, *rope(positions))
    assert torch.allclose(rotated[:, 0], x[:, 0])
    assert torch.allclose(rotated.norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_attention_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding3D(32)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def score(pq, pk):
        rq = apply_rotary(q, *rope(torch.tensor([[pq]], dtype=torch.float64)))
        rk = apply_rotary(k, *rope(torch.tensor([[pk]], dtype=torch.float64)))
        return (rq * rk).sum()

    assert torch.allclose(score([2.0, 1.0, 3.0], [1.0, 0.0, 1.0]), score([5.0, 4.0, 6.0], [4.0, 3.0, 4.0]), atol=1e-5)


def test_action_tokens_sit_strictly_between_video_frames():
    positions = action_positions(frames=2, steps_per_frame=16)
    assert torch.allclose(positions[:16, 0], torch.arange(1, 17, dtype=torch.float64) / 17)
    assert torch.allclose(positions[16:, 0], 1 + torch.arange(1, 17, dtype=torch.float64) / 17)
    assert (positions[:, 1:] == -1).all()


def test_video_positions_run_frame_then_row_then_column():
    positions = video_positions(2, 2, 3)
    assert positions[1].tolist() == [0, 0, 1] and positions[3].tolist() == [0, 1, 0] and positions[6].tolist() == [1, 0, 0]


def test_patchify_features_are_channel_major():
    latents = torch.arange(2 * 1 * 2 * 2, dtype=torch.float32).reshape(1, 2, 1, 2, 2)  # c=2, one 2x2 patch
    assert patchify(latents, (1, 2, 2))[0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]


def test_unpatchify_inverts_patchify_after_reordering_to_patch_major():
    latents = torch.randn(1, 3, 2, 4, 6)
    tokens = input_to_output_order(patchify(latents, (1, 2, 2)), (1, 2, 2))
    assert torch.equal(unpatchify(tokens, (2, 2, 3), (1, 2, 2)), latents)

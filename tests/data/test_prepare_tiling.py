"""Camera tiling in latent space (spec 2.1): side by side along width, or the RoboTwin T-shape."""

import numpy as np
import pytest
import torch

from lbva.errors import UserError
from lbva.models.standin_encoders import StandInVideoEncoder
from lbva.models.tiling import make_tiling, resize_frames
from lbva.training.data.lerobot import LeRobotDataset

CAMERAS = ["observation.images.cam_high", "observation.images.cam_left_wrist", "observation.images.cam_right_wrist"]


def test_side_by_side_concatenates_latents_along_width():
    tiling = make_tiling("side_by_side", 2, [64], [64, 96])
    a, b = torch.randn(48, 3, 4, 4), torch.randn(48, 3, 4, 6)
    canvas = tiling.tile([a, b])
    assert canvas.shape == (48, 3, 4, 10) and tiling.canvas_size(16) == (4, 10)
    assert torch.equal(canvas[..., :4], a) and torch.equal(canvas[..., 4:], b)


def test_t_shape_puts_half_size_wrists_side_by_side_above_the_head():
    tiling = make_tiling("robotwin_tshape", 3, [256], [320])
    assert tiling.camera_sizes == ((256, 320), (128, 160), (128, 160))
    head, left, right = torch.randn(48, 2, 16, 20), torch.randn(48, 2, 8, 10), torch.randn(48, 2, 8, 10)
    canvas = tiling.tile([head, left, right])
    assert canvas.shape == (48, 2, 24, 20) and tiling.canvas_size(16) == (24, 20)  # 12 x 10 = 120 tokens
    assert torch.equal(canvas[:, :, :8, :10], left) and torch.equal(canvas[:, :, :8, 10:], right)
    assert torch.equal(canvas[:, :, 8:], head)


def test_cameras_of_one_size_are_encoded_as_one_batch():
    assert make_tiling("side_by_side", 3, [64], [64, 96, 64]).groups() == [[0, 2], [1]]
    assert make_tiling("robotwin_tshape", 3, [128], [128]).groups() == [[0], [1, 2]]


@pytest.mark.parametrize("layout, cameras, heights, widths, message", [
    ("robotwin_tshape", 2, [256], [320], "needs 3 cameras"),
    ("robotwin_tshape", 3, [96], [128], "multiple of 64"),
    ("side_by_side", 2, [64, 96], [64], "one height"),
    ("side_by_side", 1, [60], [64], "multiples of 32"),
    ("grid", 1, [64], [64], "unknown layout 'grid'"),
])
def test_invalid_layouts_and_sizes_are_user_errors(layout, cameras, heights, widths, message):
    with pytest.raises(UserError, match=message):
        make_tiling(layout, cameras, heights, widths)


def test_resize_is_bilinear_without_corner_alignment_into_minus_one_to_one():
    frames = np.random.default_rng(0).integers(0, 256, (5, 48, 80, 3), dtype=np.uint8)
    pixels = resize_frames(frames, (32, 64))
    reference = torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size=(32, 64),
                                                mode="bilinear", align_corners=False)
    assert pixels.shape == (3, 5, 32, 64)
    torch.testing.assert_close(pixels, reference.permute(1, 0, 2, 3) / 127.5 - 1.0)
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0


def test_prepared_side_by_side_canvas_holds_each_camera_in_order(v3_dataset, tmp_path, run_standin, shards_of):
    run_standin(v3_dataset, tmp_path, cameras=[CAMERAS[1], CAMERAS[0]], widths=[64, 32])
    latents, *_, meta = shards_of(tmp_path, "robot")["robot__e000000__s000"]
    assert latents.shape == (48, 3, 4, 6) and meta.tokens_per_frame == 2 * 3 + 8
    frames = LeRobotDataset(v3_dataset).read_episode(0, frame_indices=range(0, 17, 2)).frames
    encoder = StandInVideoEncoder()
    expected = [encoder.encode(((resize_frames(frames[key], (64, w)) + 1) * 127.5).round().byte().permute(1, 2, 3, 0))
                for key, w in ((CAMERAS[1], 64), (CAMERAS[0], 32))]
    torch.testing.assert_close(torch.from_numpy(latents).float(), torch.cat(expected, -1), atol=2e-3, rtol=2e-3)

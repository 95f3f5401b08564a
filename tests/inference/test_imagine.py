"""Image-to-video-action (the reference's i2va) on the runtime: one observation and a prompt, then
chunks on top of their own predictions, never fed back."""

import numpy as np
import torch

from lbva.models.standin_encoders import StandInVideoEncoder as StandInVideo

from inference_fixtures import CHANNELS, CHUNK, PROMPT, STEPS_PER_FRAME, observation, runtime, tiny_model

CHUNKS = 3


def test_imagine_shapes_determinism_and_chunk0_matches_infer():
    model = tiny_model()
    rt = runtime(model)
    obs = observation(np.random.default_rng(0))
    latents, actions = rt.imagine(obs, PROMPT, CHUNKS)
    h, w = rt.sampler.latent_size
    assert latents.shape == (StandInVideo.z_dim, CHUNKS * CHUNK, h, w)
    assert actions.shape == (CHUNKS, len(CHANNELS), CHUNK, STEPS_PER_FRAME)
    assert torch.isfinite(latents).all() and np.isfinite(actions).all()

    again_latents, again_actions = rt.imagine(obs, PROMPT, CHUNKS)  # same seed at each reset
    assert torch.equal(latents, again_latents) and np.array_equal(actions, again_actions)

    rt.reset(PROMPT)
    assert np.array_equal(rt.infer(obs), actions[0])


def test_imagine_leaves_another_session_alone():
    rt = runtime(tiny_model())
    other = rt.new_session()
    rng = np.random.default_rng(1)
    first, second = observation(rng), observation(rng)
    other.reset(PROMPT)
    expected = runtime(tiny_model()).new_session()
    expected.reset(PROMPT)
    want = expected.infer(second)
    rt.imagine(first, "open the drawer", CHUNKS)
    assert np.array_equal(other.infer(second), want)


# --- over a real socket ---------------------------------------------------------------------------

def test_imagine_over_the_socket_matches_infer_and_spares_other_sessions(tmp_path):
    from inference_fixtures import tiny_bundle
    from lbva.inference.bundle import load_bundle
    from lbva.inference.client import PolicyClient
    from lbva.inference.server import BackgroundServer, ServerOptions

    server_runtime = load_bundle(tiny_bundle(tmp_path)).runtime("cpu")
    rng = np.random.default_rng(2)
    obs, other_obs = observation(rng), observation(rng)
    with BackgroundServer(server_runtime, ServerOptions(port=0)) as server:
        uri = f"ws://127.0.0.1:{server.port}"
        with PolicyClient(uri) as alone:
            alone.reset("open the drawer")
            want_other = alone.infer(other_obs, "open the drawer")
        with PolicyClient(uri) as robot, PolicyClient(uri) as dreamer:
            robot.reset("open the drawer")
            first = dreamer.imagine(obs, PROMPT, CHUNKS)
            assert np.array_equal(robot.infer(other_obs, "open the drawer"), want_other)
            second = dreamer.imagine(obs, PROMPT, CHUNKS)
            dreamer.reset(PROMPT)
            chunk0 = dreamer.infer(obs, PROMPT)
    assert first["latents"].shape[1] == CHUNKS * CHUNK and "frames" not in first  # the stand-in cannot decode
    assert first["action"].shape == (CHUNKS, len(CHANNELS), CHUNK, STEPS_PER_FRAME)
    assert np.array_equal(first["latents"], second["latents"]) and np.array_equal(first["action"], second["action"])
    assert np.array_equal(first["action"][0], chunk0)


def test_imagine_with_the_wan_vae_sends_the_decoded_frames_of_the_imagined_latents(tmp_path):
    # A bundle with the real encoder code (diffusers' AutoencoderKLWan, transformers' umT5) at tiny
    # widths: the server decodes what it imagined and sends the frames beside the latents.
    from dataclasses import replace

    from inference_fixtures import IMAGE, bundle_spec
    from lbva.checkpoints_tools.export import write_weights_checkpoint
    from lbva.inference.bundle import export_inference_bundle, load_bundle
    from lbva.inference.client import PolicyClient
    from lbva.inference.server import BackgroundServer, ServerOptions
    from lbva.models.encoders import EncoderChoice, WanVideoEncoder
    from lbva.training.data.tiny_models import write_tiny_umt5, write_tiny_wan_vae

    model = tiny_model()
    vae = write_tiny_wan_vae(tmp_path / "vae")
    text_encoder = write_tiny_umt5(tmp_path / "text_encoder", PROMPT.split(), d_model=model.config.text_dim)
    checkpoint = write_weights_checkpoint(model, tmp_path / "checkpoint", "tiny-mot", "test")
    spec = replace(bundle_spec(model), encoders=EncoderChoice("real", vae, text_encoder))
    bundle = export_inference_bundle(checkpoint, tmp_path / "bundle", spec)
    with BackgroundServer(load_bundle(bundle).runtime("cpu"), ServerOptions(port=0)) as server:
        with PolicyClient(f"ws://127.0.0.1:{server.port}") as dreamer:
            dreamed = dreamer.imagine(observation(np.random.default_rng(3)), PROMPT, CHUNKS)
    latents, frames = dreamed["latents"], dreamed["frames"]
    assert latents.shape[1] == CHUNKS * CHUNK and dreamed["action"].shape[0] == CHUNKS
    # One frame per latent frame, of the tiled canvas: the two cameras side by side.
    assert frames.dtype == np.uint8 and frames.shape == (CHUNKS * CHUNK, IMAGE, 2 * IMAGE, 3)
    decoded = WanVideoEncoder(vae, "cpu").decode_frames(torch.from_numpy(latents.copy())).numpy()
    assert np.array_equal(frames, decoded)  # the video of the very latents sent
    assert frames.std() > 0

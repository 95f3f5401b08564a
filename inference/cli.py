"""`lbva export inference CKPT OUT` and `lbva serve BUNDLE`.

The root `lbva` command (launchers/cli.py) wires them in: `register_export(export_kinds)` adds
`inference` beside checkpoints_tools' `post-training` in its `export` group, `register(commands)`
adds `serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path

from lbva.errors import UserError

from .settings import DEFAULT_PORT, InferenceSettings

# Flag name -> InferenceSettings field, for the sampling settings both commands take.
_SETTINGS_HELP = {
    "chunk_size": "latent frames per chunk (K)",
    "attention_window": "attention window in chunk-id units; the KV cache holds window // 2 chunks",
    "video_steps": "video denoising steps of the full schedule",
    "action_steps": "action denoising steps",
    "video_shift": "video sigma-schedule shift",
    "action_shift": "action sigma-schedule shift",
    "video_guidance": "video classifier-free guidance scale (1 = off)",
    "action_guidance": "action classifier-free guidance scale (1 = off)",
    "video_stop_sigma": "partial denoising: stop the video at this noise level (0 = full denoising)",
    "fdm_steps": "Euler steps of the forward-dynamics re-imagination in asynchronous mode",
    "negative_prompt": "negative prompt of classifier-free guidance",
    "seed": "noise seed of each episode",
}


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from error


def _count_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got '{text}'") from error


def _name_list(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


def _add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    for field in fields(InferenceSettings):
        kind = str if field.name == "negative_prompt" else type(field.default)
        flag = f"--{field.name.replace('_', '-')}"
        parser.add_argument(flag, type=kind, default=None, help=_SETTINGS_HELP[field.name])


def _settings_given(args: argparse.Namespace) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(InferenceSettings) if getattr(args, f.name) is not None}


def _cmd_export_inference(args: argparse.Namespace) -> None:
    from lbva.checkpoints_tools.export import model_config_from_meta
    from lbva.checkpoints_tools.manager import CheckpointError, read_meta
    from lbva.models.action_space import ActionStats
    from lbva.models.encoders import EncoderChoice
    from lbva.models.tiling import make_tiling

    from .bundle import BundleSpec, export_inference_bundle, spec_from_card, spec_from_checkpoint
    from .observations import CameraLayout

    try:
        model = model_config_from_meta(read_meta(args.checkpoint), args.checkpoint)
        known = spec_from_checkpoint(args.checkpoint)
    except CheckpointError as error:
        raise UserError(str(error)) from error
    if args.card is not None:
        if args.source is None:
            raise UserError("--card needs --source NAME, the prepared source the model serves")
        known.update(spec_from_card(args.card, args.source))
    if args.stats is not None:
        try:
            known["stats"] = ActionStats.from_dict(json.loads(args.stats.read_text()))
        except (OSError, json.JSONDecodeError) as error:
            raise UserError(f"--stats: cannot read {args.stats} ({error})") from error
    for name in ("action_channels", "actions_per_frame", "text_tokens"):
        if getattr(args, name) is not None:
            known[name] = getattr(args, name)
    if args.cameras is not None:
        if args.height is None or args.width is None:
            raise UserError("--cameras needs --height and --width (pixels, one for all cameras or one per camera)")
        known["cameras"] = CameraLayout(tuple(args.cameras),
                                        make_tiling(args.layout, len(args.cameras), args.height, args.width))
    if args.encoders == "real":
        known["encoders"] = EncoderChoice("real", args.vae, args.text_encoder)
    encoders = known.get("encoders", EncoderChoice("standin"))
    if encoders.kind == "standin":
        encoders = EncoderChoice("standin", standin_text_dim=model.text_dim)
    missing = [flag for key, flag in (("cameras", "--cameras/--height/--width"), ("stats", "--stats"),
                                      ("action_channels", "--action-channels"),
                                      ("actions_per_frame", "--actions-per-frame"), ("text_tokens", "--text-tokens"))
               if key not in known]
    if missing:
        raise UserError(f"the checkpoint does not record {', '.join(missing)}; give them (or --card with --source)")
    defaults = {key: known[key] for key in ("video_shift", "action_shift") if key in known}
    try:
        settings = InferenceSettings(**{**defaults, **_settings_given(args)})
    except TypeError as error:
        raise UserError(str(error)) from error
    spec = BundleSpec(cameras=known["cameras"], action_channels=tuple(known["action_channels"]),
                      actions_per_frame=int(known["actions_per_frame"]), stats=known["stats"], encoders=encoders,
                      text_tokens=int(known["text_tokens"]), defaults=settings)
    try:
        out = export_inference_bundle(args.checkpoint, args.out, spec, ema=args.ema)
    except CheckpointError as error:
        raise UserError(str(error)) from error
    print(f"exported inference bundle {out} (serve it with `lbva serve {out}`)")


def register_export(export_kinds: argparse._SubParsersAction) -> None:
    """Add `inference` to the `export` command group."""
    p = export_kinds.add_parser("inference", help="bf16 inference bundle: weights, config, action stats, cameras, "
                                                  "encoders and sampling defaults")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--card", type=Path, default=None, help="prepared-data card.json to take cameras, tiling, "
                   "action channels, actions per frame, stats and encoders from")
    p.add_argument("--source", default=None, help="the card's source the model serves")
    p.add_argument("--ema", action="store_true", help="serve the moving average of the weights (optim.ema_decay)")
    p.add_argument("--stats", type=Path, default=None,
                   help="action stats JSON {q01, q99} (default: the run's data_stats.json, or --card)")
    p.add_argument("--action-channels", type=_int_list, default=None, metavar="SLOT,...",
                   help="30-d slot of each robot action dim (default: the training config's)")
    p.add_argument("--actions-per-frame", type=int, default=None, help="action steps per latent frame (N)")
    p.add_argument("--text-tokens", type=int, default=None, help="prompt length in tokens (default: training's)")
    p.add_argument("--cameras", type=_name_list, default=None, metavar="KEY,...",
                   help="observation keys of the cameras in tiling order")
    p.add_argument("--layout", choices=["side_by_side", "robotwin_tshape"], default="side_by_side")
    p.add_argument("--height", type=_int_list, default=None, help="camera height(s) in pixels")
    p.add_argument("--width", type=_int_list, default=None, help="camera width(s) in pixels")
    p.add_argument("--encoders", choices=["standin", "real"], default=None,
                   help="standin, or real with --vae and --text-encoder (default: the card's, else standin)")
    p.add_argument("--vae", type=Path, default=None, help="Wan2.2 VAE folder (or a Wan2.2 diffusers root)")
    p.add_argument("--text-encoder", type=Path, default=None, help="umT5 folder (tokenizer + encoder, or their root)")
    _add_settings_arguments(p)
    p.set_defaults(func=_cmd_export_inference)


def _cmd_serve(args: argparse.Namespace) -> None:
    import torch

    from .bundle import load_bundle
    from .server import PolicyServer, ServerOptions

    token = None
    if args.token_file is not None:
        if not args.token_file.is_file():
            raise UserError(f"--token-file: {args.token_file} does not exist")
        token = args.token_file.read_text().strip()
        if not token:
            raise UserError(f"--token-file: {args.token_file} is empty")
    if args.max_message_mb <= 0:
        raise UserError(f"--max-message-mb must be > 0, got {args.max_message_mb}")
    if args.max_sessions < 1:
        raise UserError(f"--max-sessions must be >= 1, got {args.max_sessions}")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)  # before any worker thread starts: each takes this count
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
             "auto": torch.bfloat16 if device == "cuda" else torch.float32}[args.dtype]
    runtime = load_bundle(args.bundle).runtime(device, dtype, _settings_given(args))
    if args.batch_wait_ms < 0:
        raise UserError(f"--batch-wait-ms must be >= 0, got {args.batch_wait_ms}")
    batching = {"auto": None, "on": True, "off": False}[args.batch_sessions]
    parallel = None if args.parallel_requests == "auto" else args.parallel_requests
    if parallel is not None and parallel < 1:
        raise UserError(f"--parallel-requests must be >= 1 or auto, got {parallel}")
    options = ServerOptions(host=args.host, port=args.port, token=token,
                            max_message_bytes=int(args.max_message_mb * (1 << 20)), max_sessions=args.max_sessions,
                            batch_sessions=batching, batch_wait_ms=args.batch_wait_ms, parallel_requests=parallel)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    warning = exposure_warning(args.host, token)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    try:
        server = PolicyServer(runtime, options)
    except ValueError as error:
        raise UserError(str(error)) from error

    def ready(port: int) -> None:  # the port actually bound, also for --port 0
        print(f"serving {args.bundle} on ws://{args.host}:{port} ({device}, {str(dtype).replace('torch.', '')}, "
              f"{torch.get_num_threads()} threads, {server.scheduling.describe()}"
              f"{', token required' if token else ''})", flush=True)

    try:
        asyncio.run(server.serve(ready))
    except KeyboardInterrupt:
        print("stopped")
    except OSError as error:  # the port is taken, or the host is not an address of this machine
        raise UserError(f"--host/--port: cannot listen on {args.host}:{args.port} ({error.strerror or error})") from error


def exposure_warning(host: str, token: str | None) -> str | None:
    """A line for a server bound beyond this machine without a token, else None."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, not an address
        loopback = host == "localhost"
    if loopback or token is not None:
        return None
    return (f"lbva serve: warning: listening on {host} without a token: anyone who can reach this port can "
            "drive the robot; give --token-file")


def register(commands: argparse._SubParsersAction) -> None:
    """Add `serve BUNDLE` to the `lbva` subcommands."""
    p = commands.add_parser("serve", help="serve an inference bundle to robots over websocket + msgpack")
    p.add_argument("bundle", type=Path)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--token-file", type=Path, default=None,
                   help="file holding a token; clients must then send 'Authorization: Bearer <token>' "
                        "or 'Authorization: Api-Key <token>' (the reference client's form)")
    p.add_argument("--max-message-mb", type=float, default=64.0, help="largest request accepted")
    p.add_argument("--max-sessions", type=int, default=4,
                   help="concurrent connections served, each its own episode and KV cache (default 4)")
    p.add_argument("--batch-sessions", choices=["auto", "on", "off"], default="auto",
                   help="run concurrent sessions' forwards as one model call (auto: on CUDA only; on a CPU "
                        "a stacked call costs what its parts cost)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a forward waits for other sessions' forwards to share its model call "
                        "(default 5; a lone session never waits)")
    p.add_argument("--parallel-requests", type=_count_or_auto, default="auto", metavar="N|auto",
                   help="without batching, requests of different sessions run at once (auto: on a CPU the cores "
                        "over --threads, so 1 at torch's default of a thread per core; 1 on CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads of each request (default: torch's, one per physical core); fewer "
                        "threads let more requests run at once on a CPU")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto: bfloat16 on CUDA, float32 on the CPU")
    _add_settings_arguments(p)
    p.set_defaults(func=_cmd_serve)

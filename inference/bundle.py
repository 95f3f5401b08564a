"""Inference bundle: a trained checkpoint plus everything a robot server needs to run it.

    OUT/bundle.json                  what to serve and how (below)
    OUT/transformer/config.json      the model config with attn_mode "torch" (inference takes no mask)
    OUT/transformer/*.safetensors    bf16 weights (+ index), the post-training export layout

bundle.json:
    format, format_version
    source          the checkpoint folder, its step, and which weights: "trained" or "ema"
    weights_dtype   "bfloat16" (FP8 is not offered)
    actions         channels (30-d slot of each robot action dim), actions_per_frame N, q01/q99
    cameras         observation keys in tiling order, tiling layout, per-camera pixel sizes
    encoders        {"kind": "standin"} or {"kind": "real", "vae": DIR, "text_encoder": DIR}
    text_tokens     prompt length the model was trained with (zero-padded)
    defaults        InferenceSettings: chunk size K, attention window, steps, shifts, guidance scales,
                    partial-denoising stop level, forward-dynamics steps, seed
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from lbva.checkpoints_tools.export import export_post_training, load_lingbot_folder, model_config_from_meta
from lbva.checkpoints_tools.manager import read_meta
from lbva.errors import UserError
from lbva.models.action_space import ACTION_DIM, ActionStats
from lbva.models.config import ModelConfig
from lbva.models.encoders import EncoderChoice
from lbva.models.mot import LingBotVA
from lbva.models.tiling import Tiling

from .observations import ActionCodec, CameraLayout, ObservationEncoder, PromptEncoder
from .runtime import InferenceRuntime
from .settings import InferenceSettings

BUNDLE_FORMAT = "lbva-inference-bundle"
BUNDLE_VERSION = 1
BUNDLE_FILE = "bundle.json"
INFERENCE_ATTN_MODE = "torch"


@dataclass(frozen=True)
class BundleSpec:
    """Everything in bundle.json except the weights: the robot interface and the sampling defaults."""

    cameras: CameraLayout
    action_channels: tuple[int, ...]
    actions_per_frame: int
    stats: ActionStats
    encoders: EncoderChoice
    text_tokens: int
    defaults: InferenceSettings

    def validate(self, model: ModelConfig) -> None:
        """Raise UserError when the spec cannot drive `model`."""
        channels = list(self.action_channels)
        if not channels or len(set(channels)) != len(channels) or not all(0 <= c < ACTION_DIM for c in channels):
            raise UserError(f"action channels must be distinct slots in 0..{ACTION_DIM - 1}, got {channels}")
        if self.actions_per_frame < 1 or self.text_tokens < 1:
            raise UserError("actions_per_frame and text_tokens must be >= 1")
        if len(self.cameras.keys) != len(self.cameras.tiling.camera_sizes):
            raise UserError(f"{len(self.cameras.keys)} camera keys but {len(self.cameras.tiling.camera_sizes)} sizes")
        described = self.encoders.describe()
        if described["video"]["z_dim"] != model.in_channels:
            raise UserError(f"the video encoder gives {described['video']['z_dim']} latent channels, the model "
                            f"takes {model.in_channels}")
        if described["text"]["text_dim"] != model.text_dim:
            raise UserError(f"the text encoder gives {described['text']['text_dim']}-d features, the model takes "
                            f"{model.text_dim}")
        _, ph, pw = model.patch_size
        h, w = self.cameras.tiling.canvas_size(described["video"]["spatial_factor"])
        if h % ph or w % pw:
            raise UserError(f"the camera canvas is {h}x{w} latents, not a multiple of the patch {ph}x{pw}")
        try:
            self.defaults.validate()
        except ValueError as error:
            raise UserError(f"inference defaults: {error}") from error

    def to_json(self) -> dict:
        encoders = {"kind": self.encoders.kind}
        if self.encoders.kind == "real":
            encoders.update(vae=str(Path(self.encoders.vae).resolve()),
                            text_encoder=str(Path(self.encoders.text_encoder).resolve()))
        return {
            "actions": {"channels": list(self.action_channels), "actions_per_frame": self.actions_per_frame,
                        **self.stats.to_dict()},
            "cameras": {"keys": list(self.cameras.keys), **self.cameras.tiling.to_dict()},
            "encoders": encoders,
            "text_tokens": self.text_tokens,
            "defaults": asdict(self.defaults),
        }

    @classmethod
    def from_json(cls, data: dict, model: ModelConfig) -> BundleSpec:
        try:
            actions, cameras, encoders = data["actions"], data["cameras"], data["encoders"]
            known = {f.name for f in fields(InferenceSettings)}
            unknown = sorted(set(data["defaults"]) - known)
            if unknown:
                raise UserError(f"unknown inference defaults {unknown}")
            return cls(
                cameras=CameraLayout(tuple(cameras["keys"]),
                                     Tiling(cameras["layout"], tuple(tuple(s) for s in cameras["camera_sizes"]))),
                action_channels=tuple(int(c) for c in actions["channels"]),
                actions_per_frame=int(actions["actions_per_frame"]),
                stats=ActionStats.from_dict(actions),
                encoders=EncoderChoice(encoders["kind"], encoders.get("vae"), encoders.get("text_encoder"),
                                       standin_text_dim=model.text_dim),
                text_tokens=int(data["text_tokens"]),
                defaults=InferenceSettings(**data["defaults"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"{BUNDLE_FILE} is incomplete or malformed ({type(error).__name__}: {error})") from error


def export_inference_bundle(checkpoint: Path, out: Path, spec: BundleSpec, ema: bool = False) -> Path:
    """Checkpoint -> inference bundle folder OUT (bf16 transformer + bundle.json). Returns OUT.
    ema: serve the checkpoint's moving average of the weights (`optim.ema_decay`)."""
    out = Path(out)
    if (out / BUNDLE_FILE).exists():
        raise UserError(f"{out} already holds an inference bundle; pick a new folder")
    meta = read_meta(checkpoint)
    spec.validate(model_config_from_meta(meta, Path(checkpoint)))
    export_post_training(checkpoint, out, attn_mode=INFERENCE_ATTN_MODE, ema=ema)
    bundle = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "source": {"checkpoint": str(Path(checkpoint).resolve()), "step": meta.get("step"),
                   "weights": "ema" if ema else "trained"},
        "weights_dtype": "bfloat16",
        **spec.to_json(),
    }
    (out / BUNDLE_FILE).write_text(json.dumps(bundle, indent=1))
    return out


@dataclass
class Bundle:
    """A loaded bundle: the model (on the CPU, float32) and its spec."""

    folder: Path
    model: LingBotVA
    spec: BundleSpec

    def runtime(self, device: str = "cpu", dtype: torch.dtype = torch.float32,
                overrides: dict | None = None) -> InferenceRuntime:
        """An InferenceRuntime on `device` in `dtype`, with the bundle's defaults updated by `overrides`."""
        try:
            settings = replace(self.spec.defaults, **(overrides or {}))
            settings.validate()
        except (TypeError, ValueError) as error:
            raise UserError(f"inference settings: {error}") from error
        spec = self.spec
        model = self.model.to(device=device, dtype=dtype)
        canvas = spec.cameras.tiling.canvas_size(spec.encoders.describe()["video"]["spatial_factor"])
        return InferenceRuntime(
            model, settings,
            codec=ActionCodec(spec.action_channels, spec.stats),
            cameras=ObservationEncoder(spec.cameras, spec.encoders, device),
            prompts=PromptEncoder(spec.encoders, spec.text_tokens, device),
            latent_size=canvas, actions_per_frame=spec.actions_per_frame,
        )


def load_bundle(folder: Path) -> Bundle:
    """Read an inference bundle folder; raises UserError when it is not one."""
    folder = Path(folder)
    path = folder / BUNDLE_FILE
    if not path.is_file():
        raise UserError(f"{folder} is not an inference bundle ({BUNDLE_FILE} missing); make one with "
                        "`lbva export inference CKPT OUT`")
    data = json.loads(path.read_text())
    if data.get("format") != BUNDLE_FORMAT or data.get("format_version") != BUNDLE_VERSION:
        raise UserError(f"{path}: format {data.get('format')} v{data.get('format_version')}, this code reads "
                        f"{BUNDLE_FORMAT} v{BUNDLE_VERSION}")
    model = load_lingbot_folder(folder / "transformer").eval()
    spec = BundleSpec.from_json(data, model.config)
    spec.validate(model.config)
    return Bundle(folder, model, spec)


def spec_from_checkpoint(checkpoint: Path) -> dict:
    """What a training checkpoint knows about its data: {"text_tokens", "video_shift",
    "action_shift"} from its config, and, when the run trained on one prepared source, everything
    that source's card records (cameras and tiling, action channels, actions per frame, stats,
    encoders). The trainer writes the prepared datasets' cards into data_stats.json in the run
    folder, two levels above its checkpoints; with several sources, pass --card with --source.
    Runs of earlier versions on one in-process LeRobot folder recorded data.action_channels in the
    config and that folder's q01/q99 in data_stats.json, which are still read."""
    meta = read_meta(checkpoint)
    config = meta.get("config") or {}
    data, objective = config.get("data", {}), config.get("objective", {})
    found = {key: data[key] for key in ("action_channels", "text_tokens") if key in data}
    found.update({key: objective[key] for key in ("video_shift", "action_shift") if key in objective})
    stats_file = Path(checkpoint).resolve().parent.parent / "data_stats.json"
    if stats_file.is_file():
        recorded = list(json.loads(stats_file.read_text()).values())
        if len(recorded) == 1 and "q01" in recorded[0]:
            found["stats"] = ActionStats.from_dict(recorded[0])
        elif len(recorded) == 1 and len(recorded[0].get("sources", {})) == 1:
            (source,) = recorded[0]["sources"]
            found.update(_spec_from_card_data(recorded[0], source, stats_file))
    return found


def spec_from_card(card: Path, source: str) -> dict:
    """What a prepared-data card.json (`lbva data prepare`) records for `source`: cameras and tiling,
    action channels, actions per frame, stats and the encoders."""
    try:
        data = json.loads(Path(card).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"--card: cannot read {card} ({error})") from error
    return _spec_from_card_data(data, source, card)


def _spec_from_card_data(data: dict, source: str, card: Path) -> dict:
    entry = data.get("sources", {}).get(source)
    if entry is None:
        raise UserError(f"{card} has no source '{source}'; it has {sorted(data.get('sources', {}))}")
    try:
        tiling = entry["tiling"]
        encoders = data["encoders"]
        choice = EncoderChoice("standin")
        if encoders["kind"] == "real":
            # The card records the umT5 model folder and its tokenizer folder; EncoderChoice takes either
            # one folder holding both or the root above tokenizer/ and text_encoder/.
            text = Path(encoders["text"]["path"])
            root = text if Path(encoders["text"]["tokenizer_path"]) == text else text.parent
            choice = EncoderChoice("real", Path(encoders["video"]["path"]), root)
        return {
            "cameras": CameraLayout(tuple(entry["cameras"]),
                                    Tiling(tiling["layout"], tuple(tuple(size) for size in tiling["camera_sizes"]))),
            "action_channels": entry["action_channels"],
            "actions_per_frame": entry["actions_per_frame"],
            "stats": ActionStats.from_dict(entry["stats"]),
            "encoders": choice,
        }
    except (KeyError, TypeError) as error:
        raise UserError(f"{card}: source '{source}' lacks what an inference bundle needs ({error})") from error

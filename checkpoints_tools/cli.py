"""`lbva export post-training|check`, `lbva import`, `lbva ckpt inspect|verify`. The root `lbva` command
(launchers/cli.py) adds them: `register_export` into its `export` group (beside the inference
package's `export inference`), `register` at the top level."""

from __future__ import annotations

import argparse
from pathlib import Path

from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from lbva.errors import UserError

from .manager import CheckpointError, read_dcp_metadata, read_meta, verify


def inspect_checkpoint(folder: Path) -> list[str]:
    """Human-readable lines: step, model, layout, files, and every tensor with shape and dtype."""
    meta = read_meta(folder)
    entries = read_dcp_metadata(folder).state_dict_metadata
    lines = [
        f"checkpoint {folder}",
        f"  step {meta.get('step')}, contents {meta.get('contents', 'full')}, preset {meta.get('preset')}, "
        f"layout {meta.get('model', {}).get('layout')}, saved by {meta.get('world_size')} rank(s)",
        f"  files: {len(meta['files'])}, {sum(f['bytes'] for f in meta['files'].values()) / 2**20:.1f} MiB",
    ]
    model_params = 0
    for name in sorted(entries):
        entry = entries[name]
        if isinstance(entry, TensorStorageMetadata):
            numel = 1
            for size in entry.size:
                numel *= size
            if ".model." in f".{name}.":
                model_params += numel
            lines.append(f"  {name}  {list(entry.size)}  {str(entry.properties.dtype).replace('torch.', '')}")
        else:
            lines.append(f"  {name}  (object)")
    lines.insert(3, f"  model parameters: {model_params:,}")
    return lines


def _cmd_export(args) -> None:
    from .post_training import export_complete

    components = {"vae": args.vae, "text_encoder": args.text_encoder, "tokenizer": args.tokenizer}
    try:
        manifest = export_complete(args.checkpoint, args.out, components, args.attn_mode,
                                   int(args.max_shard_gb * (1 << 30)), ema=args.ema)
    except CheckpointError as error:
        raise UserError(str(error)) from error
    absent = [kind for kind, path in components.items() if path is None]
    print(f"exported {args.checkpoint}{' (EMA weights)' if args.ema else ''} to {args.out} (manifest {manifest})"
          + (f"; absent: {', '.join(absent)}" if absent else ""))


def _cmd_check(args) -> None:
    from .post_training import check_export

    try:
        rows = check_export(args.out, args.checkpoint)
    except CheckpointError as error:
        raise UserError(str(error)) from error
    for name, passed, detail in rows:
        print(f"  {name:<14} {'ok' if passed else 'FAIL':<5} {detail}")
    failed = [name for name, passed, _ in rows if not passed]
    if failed:
        raise UserError(f"{args.out}: check failed ({', '.join(failed)})")


def _cmd_import(args) -> None:
    from lbva.models.config import PRESETS
    from lbva.models.weights import WeightImportError

    from .export import import_checkpoint

    if args.kind == "wan" and args.preset not in PRESETS:
        raise UserError(f"--preset: '{args.preset}' is not a preset; known presets: {', '.join(PRESETS)}")
    try:
        folder = import_checkpoint(args.source, args.out, args.kind, args.preset)
    except WeightImportError as error:
        raise UserError(str(error)) from error
    print(f"wrote step-0 checkpoint {folder}; start from it with checkpoint.resume={folder}")


def _cmd_inspect(args) -> None:
    try:
        print("\n".join(inspect_checkpoint(args.checkpoint)))
    except CheckpointError as error:
        raise UserError(str(error)) from error


def _cmd_verify(args) -> None:
    try:
        problems = verify(args.checkpoint)
    except CheckpointError as error:
        raise UserError(str(error)) from error
    if problems:
        raise UserError(f"{args.checkpoint}: {len(problems)} problem(s): {'; '.join(problems)}")
    print(f"{args.checkpoint}: complete, all checksums match")


def register_export(export_kinds: argparse._SubParsersAction) -> None:
    """Add `post-training` and `check` to the `lbva export` group."""
    post = export_kinds.add_parser("post-training", help="diffusers-style folder for post-training")
    post.add_argument("checkpoint", type=Path)
    post.add_argument("out", type=Path)
    post.add_argument("--attn-mode", choices=["torch", "flashattn", "flex"], default="torch")
    post.add_argument("--max-shard-gb", type=float, default=5.0)
    post.add_argument("--ema", action="store_true", help="export the moving average of the weights (optim.ema_decay)")
    for kind in ("vae", "text-encoder", "tokenizer"):
        post.add_argument(f"--{kind}", type=Path, help=f"local {kind} folder copied into OUT/{kind.replace('-', '_')}")
    post.set_defaults(func=_cmd_export)

    check = export_kinds.add_parser("check", help="verify a post-training folder against its checkpoint")
    check.add_argument("out", type=Path)
    check.add_argument("--checkpoint", type=Path, help="default: the checkpoint named in the manifest")
    check.set_defaults(func=_cmd_check)


def register(commands: argparse._SubParsersAction) -> None:
    """Add `import` and `ckpt {inspect,verify}` to the `lbva` subcommands."""
    imp = commands.add_parser("import", help="released weights -> a step-0 checkpoint")
    imp.add_argument("kind", choices=["lingbot", "wan"], help="lingbot: released LingBot-VA; wan: Wan2.2 diffusers")
    imp.add_argument("source", type=Path)
    imp.add_argument("out", type=Path, help="checkpoint root to write step_00000000 into")
    imp.add_argument("--preset", default="lingbot-va-5b-mot", help="model preset for a Wan2.2 import")
    imp.set_defaults(func=_cmd_import)

    ckpt = commands.add_parser("ckpt", help="checkpoint tools")
    ckpt_commands = ckpt.add_subparsers(dest="ckpt_command", required=True)
    for name, func, text in (("inspect", _cmd_inspect, "tensors, shapes, dtypes, step, layout, sizes"),
                             ("verify", _cmd_verify, "completeness and checksums")):
        sub = ckpt_commands.add_parser(name, help=text)
        sub.add_argument("checkpoint", type=Path)
        sub.set_defaults(func=func)

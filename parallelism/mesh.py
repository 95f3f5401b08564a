"""The parallel layout of a run: its config, its validation (before any process group exists) and
the device mesh built from it (one 5-D DeviceMesh plus its flattened views).

API (used by parallelize.py, context_parallel.py, pipeline.py, the trainer and the test harness):

    ParallelConfig                     the `[parallel]` config section (sizes + AC/compile switches)
    validate_layout(config, world_size, model=ModelConfig, token_budget=, pad_multiple=)
        -> ParallelDims                the one check of a run's `[parallel]` section, called by the
                                       trainer and, against the allocation, by `lbva launch`
    ParallelDims.resolve(config, world_size, model=ModelConfig, token_budget=, pad_multiple=)
        -> ParallelDims                the mesh's part of it: any layout the mesh can build (the
                                       plan and the parity harness use it directly)
    dims.dp_size, dims.tp_enabled / cp_enabled / pp_enabled / dp_enabled / fsdp_enabled
    dims.build_mesh(device_type) -> ParallelMesh   (needs the default process group)
        mesh.world   5-D DeviceMesh, dims MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp"),
                     every dim present (size 1 allowed); mesh["tp"] etc. slice it
        mesh.dp      dp_replicate x dp_shard flattened: ranks that read different data
        mesh.dp_cp   dp_replicate x dp_shard x cp flattened: where losses / grad norms are averaged
        mesh.fsdp_mesh  "dp_shard_cp" (FSDP; CP ranks hold the same parameters and their gradients
                     are partial sums, so FSDP reduces over cp as well), or 2-D with dp_replicate (HSDP)
        mesh.dp_rank, mesh.is_logging_rank, mesh.dims, mesh.device_type

Data assignment: each of the dp_size data-parallel ranks gets its own packed sequence per step;
tp/cp ranks of one dp rank see the same sequence; gradients are the mean over dp ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lbva.models.config import ModelConfig
from lbva.errors import UserError

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass
class ParallelConfig:
    """How the run is laid out over its ranks. Sizes multiply to the world size; dp_shard -1 takes
    whatever the other dims leave, so a requeued job can come back on a different node count."""

    pp: int = 1
    # Pipeline stages per pp rank (interleaved 1F1B when > 1): depth divides by pp x this.
    pp_virtual_stages: int = 1
    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    # "full": every depth recomputes its forward in backward; "selective": every
    # `checkpoint_every`-th depth does (trading memory for compute in between).
    activation_checkpoint: Literal["none", "full", "selective"] = "none"
    checkpoint_every: int = 2
    # "auto": compile each depth on CUDA, not on CPU (compiling the tiny CPU models costs more
    # than it saves and the CPU tests must stay fast).
    compile: Literal["auto", "on", "off"] = "auto"
    # FP8 for the video stream's block linears (parallelism/fp8.py): torchao float8 (composes with
    # DTensor and FSDP2) or Transformer Engine (NGC containers; not combined with tp > 1).
    fp8: Literal["none", "torchao", "te"] = "none"
    # Packed sequences per data-parallel rank per optimizer step: the pipeline's microbatches
    # (>= pp; a multiple of pp with virtual stages), or without pipeline stages the sequences whose
    # gradients accumulate (one backward each) before the optimizer step.
    microbatches: int = 1
    # With microbatches > 1 and no pipeline: reduce-scatter the gradients once, after the last
    # sequence, instead of after each one (FSDP2's set_requires_gradient_sync). Fewer collectives,
    # but each rank then holds its replica's unsharded fp32 gradients during the step. HSDP's
    # all-reduce over dp_replicate waits for the last sequence either way (it costs no memory).
    defer_reduce_scatter: bool = False


@dataclass(frozen=True)
class ParallelDims:
    """Validated sizes of the five mesh dims and the world they fill."""

    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    world_size: int

    @classmethod
    def resolve(
        cls, config: ParallelConfig, world_size: int, *, model: ModelConfig, token_budget: int, pad_multiple: int
    ) -> ParallelDims:
        """Check the layout against the world and the model; no process group is touched.

        token_budget / pad_multiple: the packer's sequence length and the multiple each stream's part
        is padded to; sequence sharding (SP over tp, Ulysses over cp) splits each part evenly.
        """
        sizes = {name: getattr(config, name) for name in MESH_DIMS}
        for name, size in sizes.items():
            if size < 1 and not (name == "dp_shard" and size == -1):
                raise UserError(f"parallel: {name} must be >= 1 (dp_shard may be -1), got {size}")
        if config.pp_virtual_stages < 1:
            raise UserError(f"parallel: pp_virtual_stages must be >= 1, got {config.pp_virtual_stages}")
        if config.checkpoint_every < 1:
            raise UserError(f"parallel: checkpoint_every must be >= 1, got {config.checkpoint_every}")

        others = config.pp * config.dp_replicate * config.cp * config.tp
        if sizes["dp_shard"] == -1:
            if world_size % others:
                raise UserError(
                    f"parallel: pp ({config.pp}) x dp_replicate ({config.dp_replicate}) x cp ({config.cp}) x "
                    f"tp ({config.tp}) = {others} does not divide the world size ({world_size})"
                )
            sizes["dp_shard"] = world_size // others
        product = others * sizes["dp_shard"]
        if product != world_size:
            spelled = " x ".join(f"{name} ({size})" for name, size in sizes.items())
            raise UserError(f"parallel: {spelled} = {product}, but the world size is {world_size}")

        heads_split = config.tp * config.cp
        if model.num_heads % heads_split:
            raise UserError(
                f"parallel: tp ({config.tp}) x cp ({config.cp}) = {heads_split} does not divide "
                f"num_heads ({model.num_heads})"
            )
        stages = config.pp * config.pp_virtual_stages
        if model.num_layers % stages:
            raise UserError(
                f"parallel: pp ({config.pp}) x pp_virtual_stages ({config.pp_virtual_stages}) = {stages} "
                f"pipeline stages do not divide num_layers ({model.num_layers})"
            )
        if token_budget % config.cp:
            raise UserError(f"parallel: cp ({config.cp}) does not divide the token budget ({token_budget})")
        sequence_split = config.tp * config.cp
        if pad_multiple % sequence_split:
            raise UserError(
                f"parallel: tp ({config.tp}) x cp ({config.cp}) = {sequence_split} does not divide "
                f"data.pad_multiple ({pad_multiple}); each stream's tokens are sharded over both"
            )
        return cls(world_size=world_size, **sizes)

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dp_enabled(self) -> bool:
        return self.dp_size > 1

    @property
    def fsdp_enabled(self) -> bool:
        """FSDP (or HSDP, or its replicate-only form) runs whenever parameters are replicated over
        dp or cp ranks: it is what reduces their gradients."""
        return self.dp_size * self.cp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    def build_mesh(self, device_type: str) -> ParallelMesh:
        """The world mesh (all five dims) and the flattened meshes built from it; needs the default
        process group."""
        world = init_device_mesh(device_type, tuple(getattr(self, name) for name in MESH_DIMS), mesh_dim_names=MESH_DIMS)
        dp_cp = world["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        return ParallelMesh(
            dims=self,
            world=world,
            dp=world["dp_replicate", "dp_shard"]._flatten("dp"),
            dp_cp=dp_cp,
            fsdp=dp_cp._unflatten(0, (self.dp_replicate, self.dp_shard * self.cp), ("dp_replicate", "dp_shard_cp")),
        )


def validate_layout(
    config: ParallelConfig, world_size: int, *, model: ModelConfig, token_budget: int, pad_multiple: int
) -> ParallelDims:
    """Check a run's `[parallel]` section against its world size, model, token budget and pad
    multiple: the mesh's rules (`ParallelDims.resolve`) plus what the trainer drives. Touches no
    process group and no device, so a launcher calls it against the allocation before starting
    anything. Returns the validated sizes; raises UserError naming the offending numbers."""
    dims = ParallelDims.resolve(config, world_size, model=model, token_budget=token_budget, pad_multiple=pad_multiple)
    if config.microbatches < 1:
        raise UserError(f"parallel: microbatches must be >= 1, got {config.microbatches}")
    if not dims.pp_enabled and config.pp_virtual_stages > 1:
        raise UserError(
            f"parallel: pp_virtual_stages ({config.pp_virtual_stages}) > 1 needs pipeline stages (pp {config.pp})"
        )
    if dims.pp_enabled and config.pp_virtual_stages == 1 and config.microbatches < config.pp:
        raise UserError(
            f"parallel: microbatches ({config.microbatches}) must be >= pp ({config.pp}) for the 1F1B schedule"
        )
    if dims.pp_enabled and config.pp_virtual_stages > 1 and config.microbatches % config.pp:
        raise UserError(
            f"parallel: microbatches ({config.microbatches}) must be a multiple of pp ({config.pp}) for the "
            f"interleaved 1F1B schedule (pp_virtual_stages {config.pp_virtual_stages})"
        )
    if config.fp8 == "te" and dims.tp_enabled:
        raise UserError(
            f"parallel: fp8=te with tp ({config.tp}) > 1: TE layers hold plain local shards, which the DTensor "
            "TP plan does not compose with; use parallel.fp8=torchao"
        )
    return dims


@dataclass(frozen=True)
class ParallelMesh:
    """The meshes of one run. `mesh["tp"]` (also "pp", "cp", "dp_replicate", "dp_shard") is a
    dim of the world mesh; the flattened meshes are kept here rather than sliced from the world."""

    dims: ParallelDims
    world: DeviceMesh
    dp: DeviceMesh  # dp_replicate x dp_shard: ranks that read different data
    dp_cp: DeviceMesh  # dp_replicate x dp_shard x cp: where a loss or a grad norm is averaged
    fsdp: DeviceMesh  # 2-D (dp_replicate, dp_shard_cp): FSDP shards over dp_shard x cp

    def __getitem__(self, name: str) -> DeviceMesh:
        return self.world[name]

    @property
    def device_type(self) -> str:
        return self.world.device_type

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """1-D "dp_shard_cp" for FSDP, the 2-D mesh for HSDP (dp_replicate > 1)."""
        return self.fsdp if self.dims.dp_replicate > 1 else self.fsdp["dp_shard_cp"]

    @property
    def dp_rank(self) -> int:
        """Which data-parallel rank this process is: the index of the sequence it reads per step."""
        return self.dp.get_local_rank()

    @property
    def is_logging_rank(self) -> bool:
        """The one rank that logs: coordinate 0 on every dim except pp, where it is the last stage
        (the stage that computes the loss)."""
        coordinates = {name: self.world.get_local_rank(name) for name in MESH_DIMS}
        return coordinates.pop("pp") == self.dims.pp - 1 and not any(coordinates.values())

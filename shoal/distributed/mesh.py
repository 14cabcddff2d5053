"""One device mesh with named axes (the checks that a layout fits are in `layout_checks`).

The mesh has five axes, outermost first: "pp" (pipeline stages), "dp_replicate" (HSDP replicas),
"dp_shard" (FSDP shards), "cp" (context parallel), "tp" (tensor parallel). Tensor parallelism is
innermost so its frequent collectives stay between neighbouring GPUs of one node; pipeline
parallelism is outermost because it only sends activations. Three flattened axes are derived:

* "dp" = dp_replicate × dp_shard: ranks that read different samples (the data loader's rank);
* "dp_shard_cp" = dp_shard × cp: what FSDP shards parameters over (context-parallel ranks hold the
  same weights, so they share the work of storing them and reduce gradients together);
* "dp_cp" = dp_replicate × dp_shard × cp: ranks that compute different tokens, whose loss sums add
  up to the global loss.

Expert parallelism (mixture-of-experts models) is carved out of the FSDP shards: with
`expert_model_parallel_size` ep > 1, "dp_shard" is itself split into "efsdp" × "ep" (ep innermost,
so an all-to-all stays between neighbouring GPUs) and becomes a flattened axis. A sparse layer's
experts are split over "ep" and FSDP-sharded over "efsdp" (the ep-sized groups that hold the same
experts); every other weight is FSDP-sharded over all of "dp_shard" as without experts.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from shoal.config.parallel import ParallelConfig
from shoal.distributed.layout_checks import data_parallel_sizes
from shoal.errors import ShoalError

MESH_AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
# Under expert parallelism: dp_shard split into expert-FSDP groups × expert-parallel ranks.
EXPERT_MESH_AXES = ("pp", "dp_replicate", "efsdp", "ep", "cp", "tp")
# Flattened axes: name -> the mesh axes they merge.
FLAT_AXES = {
    "dp": ("dp_replicate", "dp_shard"),
    "dp_shard_cp": ("dp_shard", "cp"),
    "dp_cp": ("dp_replicate", "dp_shard", "cp"),
}


@dataclass
class ParallelDims:
    """The sizes of each axis, and the mesh once process groups exist (None in a single process)."""

    world_size: int
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1  # expert-parallel ranks, a factor of dp_shard (layout_checks makes sure)
    device_type: str = "cpu"
    mesh: DeviceMesh | None = field(default=None, repr=False)
    # The flattened axes as `_flatten` returned them (torch >= 2.11 wants callers to keep them
    # rather than slice them back out of the root mesh by name).
    flat_meshes: dict[str, DeviceMesh] = field(default_factory=dict, repr=False)

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def dp_enabled(self) -> bool:
        """Whether gradients must be reduced across ranks that hold the same weights (FSDP2 does it)."""
        return self.dp_size * self.cp > 1

    def submesh(self, name: str) -> DeviceMesh | None:
        """A mesh axis ("pp", "tp", "ep", ...) or flattened axis ("dp", "dp_shard_cp", "dp_cp")."""
        if name not in MESH_AXES and name not in EXPERT_MESH_AXES and name not in FLAT_AXES:
            raise ValueError(f"unknown mesh axis {name!r}")
        if self.mesh is None:
            return None
        if name in self.flat_meshes:  # dp_shard is flattened under expert parallelism
            return self.flat_meshes[name]
        if name in ("ep", "efsdp") and not self.ep_enabled:
            return None
        return self.mesh[name]

    def group(self, name: str) -> dist.ProcessGroup | None:
        mesh = self.submesh(name)
        return None if mesh is None else mesh.get_group()

    def rank_in(self, name: str) -> int:
        mesh = self.submesh(name)
        return 0 if mesh is None else mesh.get_local_rank()

    @property
    def dp_rank(self) -> int:
        """Which shard of each global batch this rank reads."""
        return self.rank_in("dp")

    @property
    def pp_rank(self) -> int:
        return self.rank_in("pp")

    @property
    def fsdp_mesh(self) -> DeviceMesh | None:
        """The mesh FSDP2 shards over: 1-D (dp_shard × cp), or 2-D (replicate, shard) for HSDP."""
        if self.mesh is None or not self.dp_enabled:
            return None
        if self.dp_replicate == 1:
            return self.flat_meshes["dp_shard_cp"]
        if self.cp == 1:
            return self.mesh["dp_replicate", "dp_shard"]
        with warnings.catch_warnings():
            # The one 2-D mesh that mixes a plain and a flattened axis: slicing is the only way
            # to build it in torch 2.11-2.13, deprecated or not.
            warnings.filterwarnings("ignore", message="Slicing a flattened dim")
            return self.mesh["dp_replicate", "dp_shard_cp"]

    @property
    def expert_fsdp_mesh(self) -> DeviceMesh | None:
        """What FSDP2 shards expert-parallel experts over: the groups holding the same experts
        (size 1 when every data-parallel rank is an expert-parallel one; FSDP then only gathers
        and reduces trivially, which keeps one code path)."""
        return self.submesh("efsdp") if self.ep_enabled else None

    @property
    def loss_mesh(self) -> DeviceMesh | None:
        """Ranks holding different tokens: summing their loss sums (and token counts) gives the
        global ones. Tensor-parallel and pipeline ranks are left out: they hold the same tokens."""
        return self.submesh("dp_cp") if self.dp_size * self.cp > 1 else None

    def all_reduce_over_batch(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` in place over the ranks that hold different tokens (see `loss_mesh`)."""
        mesh = self.loss_mesh
        if mesh is not None:
            dist.all_reduce(tensor, group=mesh.get_group())
        return tensor


def build_mesh(cfg: ParallelConfig, world_size: int, device_type: str) -> ParallelDims:
    """The layout's sizes and, with more than one process, its device mesh (needs the process group).
    The layout itself is checked beforehand by `check_parallel_layout`."""
    replicate, shard = data_parallel_sizes(cfg, world_size)
    dims = ParallelDims(
        world_size=world_size,
        pp=cfg.pipeline_model_parallel_size,
        dp_replicate=replicate,
        dp_shard=shard,
        cp=cfg.context_parallel_size,
        tp=cfg.tensor_model_parallel_size,
        ep=cfg.expert_model_parallel_size,
        device_type=device_type,
    )
    if world_size == 1:
        return dims
    if not dist.is_initialized():
        raise ShoalError(f"a layout over {world_size} processes needs a process group: start the run with torchrun")
    if dist.get_world_size() != world_size:
        raise ShoalError(f"world size {world_size} does not match the process group's {dist.get_world_size()}")
    if dims.ep_enabled:
        shape = (dims.pp, dims.dp_replicate, dims.dp_shard // dims.ep, dims.ep, dims.cp, dims.tp)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=EXPERT_MESH_AXES)
        flat_axes = {name: _split_shard_axis(axes) for name, axes in FLAT_AXES.items()}
        flat_axes = {"dp_shard": ("efsdp", "ep"), **flat_axes}
    else:
        shape = (dims.pp, dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_AXES)
        flat_axes = FLAT_AXES
    for name, axes in flat_axes.items():
        # DeviceMesh._flatten is the (only) way to merge axes in torch 2.11-2.13; torchtitan uses it too.
        dims.flat_meshes[name] = mesh[axes]._flatten(mesh_dim_name=name)
    dims.mesh = mesh
    return dims


def _split_shard_axis(axes: tuple[str, ...]) -> tuple[str, ...]:
    """A flattened axis's parts with dp_shard spelled as the expert mesh's efsdp × ep."""
    return tuple(part for axis in axes for part in (("efsdp", "ep") if axis == "dp_shard" else (axis,)))

"""Process-group setup for multi-process training under ``torchrun``.

``torchrun --nproc_per_node N ...`` starts N processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous address in their environment. `from_environment` reads them and joins the process group (NCCL on CUDA,
Gloo on the CPU); a plain ``python`` start is a world of one and needs no process group.
"""

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class DistributedContext:
    """Where this process sits in the job. ``device`` is the one this rank trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, evaluates and writes checkpoints."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks, in place (a no-op in a world of one); returns it."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def close(self) -> None:
        """Leave the process group if `from_environment` created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def from_environment(device: Optional[str] = None) -> DistributedContext:
    """Read torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and join the process group when there are several.

    device: None picks ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU; ``"cpu"`` forces the CPU (and the
    Gloo backend) even on a GPU machine; ``"cuda"`` means this rank's GPU.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world_size} from the environment are inconsistent")
    wants_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if wants_cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested, but CUDA is not available")
        chosen = torch.device(device) if (device and ":" in device) else torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    else:
        chosen = torch.device(device or "cpu")
    context = DistributedContext(rank, world_size, local_rank, chosen)
    if world_size > 1:
        if dist.is_initialized():
            if dist.get_world_size() != world_size:
                raise ValueError(
                    f"a process group of size {dist.get_world_size()} exists, but WORLD_SIZE is {world_size}"
                )
        else:
            dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
            context.owns_group = True
    return context

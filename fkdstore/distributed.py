"""Which process am I, and the few collectives the teacher-runner needs.

* :meth:`World.detect` is the one answer to "which rank of how many am I" (as MosaicML Streaming's
  ``World``): from :mod:`torch.distributed` when a process group is initialised, else from the
  launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, as ``torchrun`` sets them), else
  a single process.
* :class:`Collectives` is barrier / broadcast / gather over a process group: the caller's, one it
  creates from torchrun's environment (``MASTER_ADDR``; gloo, destroyed again on exit), or none, in
  which case every collective is a single-process no-op and ranks coordinate through the store's files.
* :func:`pick_device` chooses this rank's device (``cuda:LOCAL_RANK`` under a launcher).

torch is imported only when a function needs it, so :meth:`World.detect` works without torch.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from .errors import ValidationError

__all__ = ["World", "Collectives", "pick_device"]


def _initialised_dist():
    """:mod:`torch.distributed` when torch is already imported and a process group exists, else ``None``.

    A process group can only exist once torch has been imported, so this never imports torch itself.
    """
    if "torch" not in sys.modules or sys.modules["torch"] is None:
        return None
    import torch.distributed as dist  # noqa: PLC0415 - torch already imported here; World.detect needs no torch

    return dist if dist.is_available() and dist.is_initialized() else None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValidationError(f"environment variable {name} must be an integer. Got {raw!r}.") from None


@dataclass(frozen=True)
class World:
    """This process's place in a multi-process run: ``rank`` of ``world_size`` processes, and
    ``local_rank`` (its index on this machine, which picks its GPU)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValidationError(
                f"RANK and WORLD_SIZE must satisfy 0 <= RANK < WORLD_SIZE. Got RANK={self.rank}, "
                f"WORLD_SIZE={self.world_size}."
            )
        if self.local_rank < 0:
            raise ValidationError(f"LOCAL_RANK must be a non-negative integer. Got {self.local_rank}.")

    @property
    def is_leader(self) -> bool:
        """Rank 0: the process that creates the store and writes its attributes."""
        return self.rank == 0

    @classmethod
    def detect(cls) -> World:
        """The current process's world: torch.distributed's rank and size when a process group is
        initialised, else ``RANK``/``WORLD_SIZE`` from the environment (default ``0``/``1``);
        ``local_rank`` is ``LOCAL_RANK`` (default ``0``)."""
        local_rank = _env_int("LOCAL_RANK", 0)
        dist = _initialised_dist()
        if dist is not None:
            return cls(dist.get_rank(), dist.get_world_size(), local_rank)
        return cls(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), local_rank)


class Collectives:
    """Barrier, broadcast and gather of picklable objects among the ranks of :attr:`world`.

    Use as a context manager (``with Collectives() as comm:``): a gloo process group created here from
    torchrun's environment (``MASTER_ADDR`` set, ``WORLD_SIZE > 1``, no group yet) is destroyed on
    exit; a group the caller created is used and left alone. Object collectives always run on a gloo
    group (a second, gloo, group is made when the caller's backend is NCCL). Without any group
    (:attr:`active` false) a barrier does nothing, ``broadcast(x)`` returns ``x`` and ``gather(x)``
    returns ``[x]``: ranks launched with only ``RANK``/``WORLD_SIZE`` must coordinate another way.
    """

    def __init__(self) -> None:
        import torch.distributed as dist  # noqa: PLC0415 - torch stays optional: this module is torch-free at import

        self._dist = dist
        self._created = False
        self.world = World.detect()
        self.active = self.world.world_size > 1 and _initialised_dist() is not None
        if (self.world.world_size > 1 and not self.active and dist.is_available()
                and "MASTER_ADDR" in os.environ):
            dist.init_process_group("gloo", rank=self.world.rank, world_size=self.world.world_size)
            self._created = self.active = True
        self._group = None
        if self.active and dist.get_backend() != "gloo":  # object collectives run on CPU tensors
            self._group = dist.new_group(backend="gloo")

    def barrier(self) -> None:
        """Wait until every rank got here."""
        if self.active:
            self._dist.barrier(group=self._group)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj``, on every rank."""
        if not self.active:
            return obj
        box = [obj]
        self._dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def gather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out = [None] * self.world.world_size
        self._dist.all_gather_object(out, obj, group=self._group)
        return out

    def close(self) -> None:
        """Destroy the process group if this object created it (idempotent)."""
        if self._created:
            self._created = False
            self._dist.destroy_process_group()

    def __enter__(self) -> Collectives:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pick_device(device: Any, world: World):
    """The :class:`torch.device` this rank runs the teacher on.

    ``None``: ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``. A bare ``"cuda"`` also becomes
    ``cuda:LOCAL_RANK``; anything else is taken as given (``torch.device(device)``). A CUDA device on a
    machine without CUDA, or a name torch does not know, raises :class:`ValidationError`.
    """
    import torch  # noqa: PLC0415 - torch stays optional: this module is torch-free at import

    if device is None:
        return torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValidationError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1'. Got {device!r} "
                              f"({e}).") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValidationError(f"device {device!r} needs CUDA, which this machine does not have (torch "
                              f"{torch.__version__}); use 'cpu', or leave the device unset to pick CUDA when present.")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", world.local_rank)
    return dev

"""Data-parallel runs under torchrun: an explicit context, the process group, and the few collectives we use.

The core never reads the environment: the CLI (or any entry point) builds a :class:`DistContext` with
:func:`context_from_env` and opens the process group with :func:`session`; the pipeline and the methods get
the context passed down. A default ``DistContext()`` is one process: every collective is then the identity,
so single-process code paths pay nothing.

Invariants of a distributed run:

* every rank holds the same state after every collective step (the search's fitness table, the student's
  weights under DistributedDataParallel, every decision: time budget, divergence, cancellation);
* only rank 0 (``is_main``) writes files or prints results;
* a failure on one rank stops all ranks: the failing rank publishes its rank in the process group's store,
  a watchdog thread on every other rank sees it and ends its process at once (a rank blocked inside a
  collective would otherwise wait for a peer that never comes), and only the failing rank reports the error.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from onnxsparse.errors import OnnxSparseError

logger = logging.getLogger(__name__)

FAILED_KEY = "onnxsparse/failed"
EXIT_PEER_FAILED = 2  # the exit status of a rank stopped because another rank failed (a user error's, too)


@dataclass(frozen=True)
class DistContext:
    """Who this process is in a run. ``world_size == 1`` (the default) is a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None  # the rank's device; None: the pipeline resolves --device itself
    backend: str | None = None  # "nccl" on CUDA, "gloo" on CPU; None in a single-process run

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------------ data
    def local_batch(self, batch_size: int) -> int:
        """This rank's share of a global batch (the global batch, and so the step count, stay as in 1 process)."""
        if batch_size % self.world_size:
            raise OnnxSparseError(
                f"batch size {batch_size} does not split over {self.world_size} processes; "
                f"use a --batch-size that is a multiple of {self.world_size}"
            )
        return batch_size // self.world_size

    def wrap(self, module: nn.Module) -> nn.Module:
        """DistributedDataParallel around ``module`` (its constructor copies rank 0's state to every rank)."""
        if not self.active:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device] if self.device is not None and self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    # ------------------------------------------------------------------ collectives
    def _tensor(self, values, dtype=torch.float64) -> torch.Tensor:
        # NCCL reduces CUDA tensors only; gloo CPU tensors
        device = self.device if self.backend == "nccl" else torch.device("cpu")
        return torch.as_tensor(values, dtype=dtype).to(device)

    def any(self, flag: bool | torch.Tensor) -> bool:
        """True when ``flag`` is true on any rank (one host read)."""
        if not self.active:
            return bool(flag)
        t = self._tensor(float(bool(flag)))
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def all(self, flag: bool | torch.Tensor) -> bool:
        return not self.any(not bool(flag))

    def mean_float(self, value: float) -> float:
        if not self.active:
            return float(value)
        t = self._tensor(float(value))
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world_size

    def broadcast_float(self, value: float) -> float:
        """Rank 0's ``value`` on every rank."""
        if not self.active:
            return float(value)
        t = self._tensor(float(value))
        torch.distributed.broadcast(t, src=0)
        return float(t.item())

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, device=self._object_device())
        return box[0]

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order, on every rank (fitness values and their details)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        if self._object_device() is not None:
            torch.cuda.set_device(self.device)
        torch.distributed.all_gather_object(out, obj)
        return out

    @torch.no_grad()
    def broadcast_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers into ``module`` on every rank."""
        if not self.active:
            return
        for value in module.state_dict().values():
            if not isinstance(value, torch.Tensor):
                continue
            if self.backend == "nccl" and value.device.type != "cuda":
                staged = value.to(self.device)
                torch.distributed.broadcast(staged, src=0)
                value.copy_(staged.to(value.device))
            else:
                torch.distributed.broadcast(value, src=0)

    def _object_device(self) -> torch.device | None:
        return self.device if self.backend == "nccl" else None


def context_from_env(env: Mapping[str, str], device_spec: str = "auto") -> DistContext:
    """The context torchrun describes in ``env`` (WORLD_SIZE, RANK, LOCAL_RANK); one process without them.

    ``device_spec`` is ``--device``: ``auto`` or ``cuda`` give each rank ``cuda:LOCAL_RANK`` when CUDA is
    there (NCCL), else the CPU (gloo); ``cpu`` forces gloo on the CPU; ``cuda:N`` cannot name one device for
    several processes.
    """
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise OnnxSparseError(
            f"WORLD_SIZE/RANK/LOCAL_RANK must be integers, got {env.get('WORLD_SIZE')!r}/{env.get('RANK')!r}/"
            f"{env.get('LOCAL_RANK')!r}"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise OnnxSparseError(f"RANK {rank} must be in 0..WORLD_SIZE-1 (WORLD_SIZE {world})")
    if world == 1:
        return DistContext()
    if device_spec.startswith("cuda:"):
        raise OnnxSparseError(
            f"--device {device_spec} names one GPU for {world} processes; use --device cuda (each process takes "
            "cuda:LOCAL_RANK) or --device cpu"
        )
    use_cuda = device_spec in ("auto", "cuda") and torch.cuda.is_available()
    if device_spec == "cuda" and not use_cuda:
        raise OnnxSparseError("--device cuda requested but CUDA is not available; use --device cpu or auto")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise OnnxSparseError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) visible: start at most "
                f"{torch.cuda.device_count()} processes per node"
            )
        return DistContext(rank, world, torch.device("cuda", local), "nccl")
    return DistContext(rank, world, torch.device("cpu"), "gloo")


def _first_failure(store, rank: int) -> bool:
    """Publish this rank's failure unless another rank's is there already; True when this rank was first."""
    try:
        won = store.compare_set(FAILED_KEY, "", str(rank))
    except Exception:  # noqa: BLE001 - no store left to tell: report our own error
        return True
    return int(won) == rank


class _Watchdog:
    """Ends this process when another rank has published a failure in the store."""

    def __init__(self, store, rank: int, interval_s: float = 0.2):
        self.store, self.rank, self.interval = store, rank, interval_s
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="onnxsparse-dist-watchdog", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(self.interval):
            try:
                if not self.store.check([FAILED_KEY]):
                    continue
                failed = int(self.store.get(FAILED_KEY))
            except Exception:  # noqa: BLE001 - the store is gone: rank 0 has ended, nothing left to watch
                return
            if failed != self.rank:
                logger.debug("rank %d failed; rank %d stops", failed, self.rank)
                sys.stderr.flush()
                os._exit(EXIT_PEER_FAILED)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=1.0)


@contextlib.contextmanager
def session(ctx: DistContext, *, timeout_s: float = 1800.0, store=None) -> Iterator[DistContext]:
    """The process group for ``ctx`` (nothing in a single-process run), torn down on exit.

    ``store`` (a torch.distributed Store) replaces torchrun's ``env://`` rendezvous, e.g. a FileStore in tests.
    On an exception this rank publishes its failure (the other ranks stop, see the module docstring) and
    re-raises; on success all ranks meet at a barrier, so rank 0's writing is over before anyone exits.
    """
    if not ctx.active:
        yield ctx
        return
    import torch.distributed as tdist

    if ctx.device is not None and ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    kwargs: dict[str, Any] = {"backend": ctx.backend, "rank": ctx.rank, "world_size": ctx.world_size,
                              "timeout": datetime.timedelta(seconds=timeout_s)}
    if store is not None:
        kwargs["store"] = store
    else:
        kwargs["init_method"] = "env://"
    if ctx.backend == "nccl" and ctx.device is not None:
        kwargs["device_id"] = ctx.device
    tdist.init_process_group(**kwargs)
    group_store = tdist.distributed_c10d._get_default_store()
    watchdog = _Watchdog(group_store, ctx.rank)
    try:
        yield ctx
        tdist.barrier()
    except BaseException:
        if _first_failure(group_store, ctx.rank):
            raise
        # a peer failed first and reports it; this rank's error (a broken collective, most likely) is its echo
        raise SystemExit(EXIT_PEER_FAILED) from None
    finally:
        watchdog.stop()
        with contextlib.suppress(Exception):
            tdist.destroy_process_group()

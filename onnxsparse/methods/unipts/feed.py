"""The training split fed to dynamic sparse training: per-epoch shuffled batches of this rank's shard, resident
on the device where they fit, else gathered on the host and prefetched by a background thread."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np
import torch

logger = logging.getLogger(__name__)

RESIDENT_FRACTION = 0.25  # of free GPU memory the training split may occupy resident
RESIDENT_CPU_BYTES = 4 << 30  # on the CPU "resident" is a torch view of the host arrays: no copy
PREFETCH_DEPTH = 2


def training_batches(ctx, batch_size: int, augment: bool,
                     flip: bool = True) -> Callable[[int], Iterator[tuple[torch.Tensor, ...]]]:
    """``epoch -> batches`` of the training split: this rank's shard of each global ``batch_size`` batch,
    shuffled per epoch, from tensors resident on the device when the split fits ``RESIDENT_FRACTION`` of its
    free memory, else gathered on the host with the next batches prefetched by a thread."""
    device = ctx.device
    resident = ctx.calib.resident("train", device, _resident_budget(device))
    local = ctx.dist.local_batch(batch_size)
    logger.info("training split %s", f"resident on {device}" if resident is not None else "streamed, prefetched")

    def epoch_batches(epoch: int) -> Iterator[tuple[torch.Tensor, ...]]:
        seed = int(np.random.SeedSequence([ctx.config.seed, 0xD57, epoch]).generate_state(1)[0])
        batches = ctx.calib.batches("train", local, shuffle=True, seed=seed, augment=augment, flip=flip, device=device,
                                    drop_last=True, rank=ctx.dist.rank, world_size=ctx.dist.world_size,
                                    resident=resident)
        return batches if resident is not None else prefetch(batches, PREFETCH_DEPTH)

    return epoch_batches


def _resident_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(RESIDENT_FRACTION * free)
    return RESIDENT_CPU_BYTES


def prefetch(iterator: Iterator, depth: int) -> Iterator:
    """``iterator``'s items, produced ``depth`` ahead by a background thread (host gathering and copies
    overlap the device's work); the thread's exception is raised here; closing stops the thread."""
    items: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    done = object()
    stopped = threading.Event()

    def produce() -> None:
        try:
            for item in iterator:
                while not stopped.is_set():
                    try:
                        items.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stopped.is_set():
                    return
            items.put((done, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            items.put((done, exc))

    thread = threading.Thread(target=produce, name="onnxsparse-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = items.get()
            if item is done:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stopped.set()
        thread.join(timeout=5.0)

"""Multi-process evaluation: shard the batches of a set across ranks and gather per-sample results.

Launch `hf-dawin evaluate` with `accelerate launch --num_processes N -m hf_dawin.cli evaluate ...` or
`torchrun --nproc_per_node N -m hf_dawin.cli evaluate ...`. Each rank runs the model on its share of the
batches. Per-sample logits, labels and example indices are gathered onto every rank and put back in example
order, so every later step (entropies, the offset statistics, the Beta mixture, scores) reads the same arrays
as in a single-process run. Set-level fits run on the main process and are broadcast as JSON, never pickled.

A rank that raises reports the error to all ranks at the next synchronisation point, and every rank then
raises a `RuntimeError` naming the failed rank, so no process waits forever and no partial result is
written.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from transformers.utils import logging


logger = logging.get_logger(__name__)

__all__ = [
    "DistributedState",
    "RankFailedError",
    "dataset_shard_batches",
    "get_distributed_state",
    "shard_batch_positions",
]

# Bytes of each rank's error message shared with the other ranks.
_MESSAGE_BYTES = 2048

T = TypeVar("T")


class RankFailedError(RuntimeError):
    """Raised on every rank when one or more ranks of a multi-process evaluation failed."""

    def __init__(self, step: str, failures: dict[int, str]):
        self.step = step
        self.failures = failures
        details = "; ".join(f"rank {rank}: {message}" for rank, message in sorted(failures.items()))
        ranks = ", ".join(str(rank) for rank in sorted(failures))
        super().__init__(
            f"The evaluation failed on rank {ranks} during {step} ({details}). No result was written for this run."
        )


def shard_batch_positions(num_batches: int, rank: int, world_size: int) -> range:
    """Return the positions of the batches that `rank` runs: a contiguous block, at most one more than others.

    Contiguous blocks keep the batch boundaries of a single-process run, so each batch (and its numerics) is
    the same whichever process runs it.
    """
    per_rank, remainder = divmod(num_batches, world_size)
    start = rank * per_rank + min(rank, remainder)
    return range(start, start + per_rank + (1 if rank < remainder else 0))


@dataclass(frozen=True)
class DistributedState:
    """Rank, world size and collectives of an evaluation; a world size of 1 makes every collective a no-op.

    Attributes:
        rank (`int`): This process's rank, 0 on the main process.
        world_size (`int`): Number of processes.
        device (`torch.device`): Device used for collectives (the process's GPU with NCCL, else CPU).
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------------------------------------------------
    # Sharding
    # ------------------------------------------------------------------------------------------------------

    def local_batches(self, batches: Iterable[T]) -> Iterator[T]:
        """Yield every `world_size`-th batch of an iterable of all batches of a set, starting at `rank`.

        Each batch is the same as in a single-process run, whichever rank runs it. Every rank still reads
        every batch, so sets that can read a shard directly should provide their own sharding instead (see
        `EvaluationSet.shard_batches`).
        """
        for position, batch in enumerate(batches):
            if position % self.world_size == self.rank:
                yield batch

    # ------------------------------------------------------------------------------------------------------
    # Collectives
    # ------------------------------------------------------------------------------------------------------

    def _all_gather(self, tensor: torch.Tensor, step: str) -> list[torch.Tensor]:
        local = tensor.to(self.device).contiguous()
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        try:
            dist.all_gather(gathered, local)
        except RuntimeError as error:
            raise RuntimeError(
                f"Rank {self.rank} lost contact with the other evaluation processes during {step}: {error}. "
                "Another rank probably stopped; its log names the cause. No result was written for this run."
            ) from error
        return [part.to(tensor.device) for part in gathered]

    def check_all_ranks(self, error: BaseException | None, step: str) -> None:
        """Share whether each rank failed; raise `RankFailedError` on every rank if any did.

        Args:
            error (`BaseException` or `None`): The error this rank raised during `step`, if any.
            step (`str`): What the ranks were doing, for the message.
        """
        if not self.is_distributed:
            if error is not None:
                raise error
            return
        text = "" if error is None else f"{type(error).__name__}: {error}"
        encoded = text.encode("utf-8")[: _MESSAGE_BYTES - 1]
        buffer = torch.zeros(_MESSAGE_BYTES + 1, dtype=torch.uint8)
        buffer[0] = 1 if error is not None else 0
        buffer[1 : 1 + len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8)
        failures = {}
        for rank, part in enumerate(self._all_gather(buffer, step)):
            if int(part[0]):
                failures[rank] = bytes(part[1:].tolist()).rstrip(b"\0").decode("utf-8", errors="replace")
        if failures:
            raise RankFailedError(step, failures) from error

    def run(self, step: str, function: Callable[[], T]) -> T:
        """Run `function` on every rank; if any rank raises, raise `RankFailedError` on all of them.

        With one process, `function` runs unwrapped and its errors propagate unchanged.
        """
        if not self.is_distributed:
            return function()
        try:
            result = function()
        except Exception as error:  # noqa: BLE001 - reported to every rank, then raised
            logger.error("Rank %d failed during %s: %s", self.rank, step, error)
            self.check_all_ranks(error, step)
            raise  # unreachable: check_all_ranks raises for this rank's error
        self.check_all_ranks(None, step)
        return result

    def gather_rows(self, tensors: dict[str, torch.Tensor], step: str) -> dict[str, torch.Tensor]:
        """Concatenate each tensor's rows from all ranks, in rank order; returns the same on every rank.

        Ranks may hold different numbers of rows (zero included); the trailing dimensions and dtypes must agree.

        Args:
            tensors (`dict[str, torch.Tensor]`): Tensors of shape `(num_local_rows, ...)` with equal row counts.
            step (`str`): What is being gathered, for error messages.

        Returns:
            `dict[str, torch.Tensor]`: Tensors of shape `(num_rows_of_all_ranks, ...)` on the CPU.
        """
        if not self.is_distributed:
            return {name: tensor.cpu() for name, tensor in tensors.items()}
        counts = {tensor.shape[0] for tensor in tensors.values()}
        if len(counts) != 1:
            raise ValueError(f"Expected the same number of rows in every tensor gathered in {step}, received {counts}.")
        local_rows = counts.pop()
        rows = [int(part) for part in self._all_gather(torch.tensor([local_rows], dtype=torch.long), step)]
        gathered = {}
        for name, tensor in tensors.items():
            padded = torch.zeros((max(rows),) + tuple(tensor.shape[1:]), dtype=tensor.dtype)
            padded[:local_rows] = tensor.cpu()
            parts = self._all_gather(padded, step)
            gathered[name] = torch.cat([part[:count] for part, count in zip(parts, rows)]).cpu()
        return gathered

    def broadcast_json(self, value, step: str):
        """Send a JSON-serialisable value from the main process to every rank and return it there."""
        if not self.is_distributed:
            return value
        if self.is_main_process:
            encoded = json.dumps(value).encode("utf-8")
        else:
            encoded = b""
        length = torch.tensor([len(encoded)], dtype=torch.long).to(self.device)
        try:
            dist.broadcast(length, src=0)
            buffer = torch.zeros(int(length.item()), dtype=torch.uint8)
            if self.is_main_process:
                buffer[:] = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
            buffer = buffer.to(self.device)
            dist.broadcast(buffer, src=0)
        except RuntimeError as error:
            raise RuntimeError(
                f"Rank {self.rank} lost contact with the other evaluation processes during {step}: {error}."
            ) from error
        return json.loads(bytes(buffer.cpu().tolist()).decode("utf-8"))

    def main_process_first(self, step: str, function: Callable[[], T]) -> T:
        """Run `function` on the main process, then on the other ranks; for steps that fill a shared cache.

        A failure on any rank raises `RankFailedError` on every rank, as in `run`.
        """
        if not self.is_distributed:
            return function()
        result, error = None, None
        if self.is_main_process:
            try:
                result = function()
            except Exception as caught:  # noqa: BLE001 - reported to every rank, then raised
                error = caught
        self.check_all_ranks(error, f"{step} (main process)")
        if not self.is_main_process:
            try:
                result = function()
            except Exception as caught:  # noqa: BLE001 - reported to every rank, then raised
                error = caught
        self.check_all_ranks(error, f"{step} (other ranks)")
        return result

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()


def dataset_shard_batches(
    make_batches: Callable[[object], Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]],
    dataset,
    batch_size: int,
) -> Callable[[int, int], Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Build the `shard_batches` of an evaluation set read from a `datasets.Dataset`.

    Rank r reads only its contiguous block of whole batches (see `shard_batch_positions`) through
    `make_batches(dataset.select(rows))`, and the yielded indices are shifted back to rows of `dataset`. When no
    image is skipped, the batches are exactly those of a single-process run.

    Args:
        make_batches (`Callable`): Yields `(pixel_values, labels, indices)` batches of `batch_size` images of the
            dataset it is given, with `indices` relative to that dataset (as `iter_image_batches` does).
        dataset (`datasets.Dataset`): The whole evaluation set.
        batch_size (`int`): Images per batch, the same as `make_batches` uses.

    Returns:
        `Callable[[int, int], Iterator]`: `shard_batches(rank, world_size)`.
    """

    def shard_batches(rank: int, world_size: int):
        positions = shard_batch_positions(math.ceil(len(dataset) / batch_size), rank, world_size)
        start = positions.start * batch_size
        end = min(positions.stop * batch_size, len(dataset))
        if start >= end:
            return
        for pixel_values, labels, indices in make_batches(dataset.select(range(start, end))):
            yield pixel_values, labels, indices + start

    return shard_batches


def get_distributed_state() -> DistributedState:
    """Return the state of the current launch, initialising the process group if the launcher did not.

    A single process (no `WORLD_SIZE` above 1 and no initialised process group) gets rank 0 of 1 without any
    process group. Under `accelerate launch` or `torchrun`, Accelerate's `PartialState` initialises the group
    (NCCL on GPUs). Accelerate 1.16 leaves a `torchrun` launch on CPU without one, so a gloo group is then
    initialised from the launcher's environment variables.
    """
    initialised = dist.is_available() and dist.is_initialized()
    if not initialised and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistributedState()
    device = torch.device("cpu")
    if not initialised:
        from accelerate import PartialState

        state = PartialState()
        if state.device.type == "cuda":
            device = state.device
        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")
    elif dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    if dist.get_world_size() <= 1:
        return DistributedState()
    return DistributedState(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)

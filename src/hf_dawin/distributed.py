"""Multi-process evaluation through Accelerate: split the batches of a set across processes and gather results.

Launch `hf-dawin evaluate` with `accelerate launch --num_processes N -m hf_dawin.cli evaluate ...` or
`torchrun --nproc_per_node N -m hf_dawin.cli evaluate ...`. An `accelerate.Accelerator` sets up the process
group (gloo on CPU, NCCL on GPUs). Each set's batches are split into contiguous blocks with
`Accelerator.split_between_processes`, so every batch is the same as in a single-process run whichever process
runs it. Per-sample logits, labels and example indices are padded with `pad_across_processes`, gathered with
`gather_for_metrics` and put back in example order, so every later step (entropies, the offset statistics, the
Beta mixture, scores) reads the same arrays as in a single-process run. Set-level fits run on the main process
and are broadcast as JSON, never pickled.

A process that raises reports the error to all processes at the next synchronisation point, and every process
then raises a `RankFailedError` naming the failed rank, so no process waits forever and no partial result is
written.
"""

from __future__ import annotations

import json
import logging as pylogging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist
from transformers.utils import logging


if TYPE_CHECKING:
    from accelerate import Accelerator


logger = logging.get_logger(__name__)

__all__ = [
    "DatasetShards",
    "DistributedState",
    "RankFailedError",
    "RankLostError",
    "RowRangeShards",
    "dataset_shard_batches",
    "get_distributed_state",
    "is_main_launch_process",
]

# Bytes of each rank's error message shared with the other ranks.
_MESSAGE_BYTES = 2048
# Gathered alongside the caller's tensors: 1 for a real row, 0 for the padding that evens out the row counts.
_PRESENT = "__present__"

T = TypeVar("T")
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


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


class RankLostError(RuntimeError):
    """Raised on a rank whose collective failed because another process of the evaluation stopped."""


@dataclass(frozen=True)
class DistributedState:
    """The processes of an evaluation and their collectives; without an accelerator every collective is a no-op.

    Attributes:
        accelerator (`accelerate.Accelerator`, *optional*): The accelerator of a multi-process launch. `None`
            for a single process.
    """

    accelerator: Accelerator | None = None

    @property
    def rank(self) -> int:
        return 0 if self.accelerator is None else self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return 1 if self.accelerator is None else self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        """Device of this process's collectives and model: its GPU under NCCL, else the CPU."""
        return torch.device("cpu") if self.accelerator is None else self.accelerator.device

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------------------------------------------------
    # Splitting the data
    # ------------------------------------------------------------------------------------------------------

    def split(self, items: Sequence[T]) -> Sequence[T]:
        """Return this process's contiguous block of `items`; earlier processes get one more when they do not divide.

        Uses `Accelerator.split_between_processes` without padding, so every item goes to exactly one process.
        """
        if not self.is_distributed:
            return items
        with self.accelerator.split_between_processes(list(items)) as local:
            return local

    def local_batches(self, batches: Iterable[T]) -> Iterator[T]:
        """Yield every `world_size`-th batch of an iterable of all batches of a set, starting at `rank`.

        The fallback for batch sources of unknown length. Each batch is the same as in a single-process run,
        whichever rank runs it, but every rank still reads every batch, so sets that can read a block directly
        should provide their own `shard_batches` (see `EvaluationSet.shard_batches` and `dataset_shard_batches`).
        """
        for position, batch in enumerate(batches):
            if position % self.world_size == self.rank:
                yield batch

    # ------------------------------------------------------------------------------------------------------
    # Collectives
    # ------------------------------------------------------------------------------------------------------

    def _collective(self, step: str, operation: Callable[[], T]) -> T:
        """Run a collective, and raise an error naming `step` if another process has stopped."""
        try:
            return operation()
        except (RuntimeError, ValueError) as error:
            if self.world_size == 2:
                # With two processes the peer that stopped can only be the other one.
                lost = f"rank {1 - self.rank}, the other evaluation process,"
                stopped = f"Rank {1 - self.rank} probably stopped"
            else:
                lost = "the other evaluation processes"
                stopped = "Another rank probably stopped"
            raise RankLostError(
                f"Rank {self.rank} lost contact with {lost} during {step}: {error}. {stopped} (the launcher's "
                "summary names its exit code, and its log the cause). No result was written for this run."
            ) from error

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
        buffer = torch.zeros(1, _MESSAGE_BYTES + 1, dtype=torch.uint8)
        buffer[0, 0] = 1 if error is not None else 0
        buffer[0, 1 : 1 + len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8)
        gathered = self._collective(step, lambda: self.accelerator.gather(buffer.to(self.device))).cpu()
        failures = {}
        for rank, part in enumerate(gathered):
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

        Ranks may hold different numbers of rows (zero included): the rows are padded to the largest count with
        `pad_across_processes`, gathered with `gather_for_metrics`, and the padding is dropped. The trailing
        dimensions and dtypes must agree across ranks.

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
        local = {name: tensor.to(self.device).contiguous() for name, tensor in tensors.items()}
        local[_PRESENT] = torch.ones(counts.pop(), dtype=torch.uint8, device=self.device)

        def gather():
            padded = self.accelerator.pad_across_processes(local, dim=0, pad_index=0)
            return self.accelerator.gather_for_metrics(padded)

        gathered = self._collective(step, gather)
        present = gathered.pop(_PRESENT).bool().cpu()
        return {name: tensor.cpu()[present] for name, tensor in gathered.items()}

    def broadcast_json(self, value, step: str):
        """Send a JSON-serialisable value from the main process to every rank and return it there."""
        if not self.is_distributed:
            return value
        from accelerate.utils import broadcast

        encoded = json.dumps(value).encode("utf-8") if self.is_main_process else b""

        def send() -> bytes:
            length = broadcast(torch.tensor([len(encoded)], dtype=torch.long, device=self.device), from_process=0)
            buffer = torch.zeros(int(length.item()), dtype=torch.uint8)
            if self.is_main_process:
                buffer[:] = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
            return bytes(broadcast(buffer.to(self.device), from_process=0).cpu().tolist())

        return json.loads(self._collective(step, send).decode("utf-8"))

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
            self.accelerator.wait_for_everyone()

    def quiet_other_processes(self) -> None:
        """On every process but the main one, hide progress bars and log only errors.

        This covers the transformers and datasets loggers and hf_dawin's own, which Python's root logger prints
        (for example the warning about skipped images, whose counts are local to each process).
        """
        if self.is_main_process:
            return
        import datasets
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
        datasets.disable_progress_bars()
        pylogging.getLogger(__name__.split(".")[0]).setLevel(pylogging.ERROR)


class RowRangeShards:
    """The `shard_batches` of an evaluation set that can read the batches of any contiguous range of its rows.

    The set's batch positions are split with `DistributedState.split`, and each process reads the rows of its
    block of whole batches, so every batch is the same as in a single-process run.

    Args:
        read_rows (`Callable[[range], Iterable[Batch]]`): Yields the `(pixel_values, labels, indices)` batches of
            the given rows, in batches of `batch_size` starting at the range's first row, with `indices` that are
            rows of the whole set.
        num_rows (`int`): Rows in the whole set.
        batch_size (`int`): Images per batch.
    """

    def __init__(self, read_rows: Callable[[range], Iterable[Batch]], num_rows: int, batch_size: int):
        self.read_rows = read_rows
        self.num_rows = num_rows
        self.batch_size = batch_size

    def rows(self, state: DistributedState) -> range:
        """Return the rows that `state`'s process reads: whole batches of a contiguous block."""
        positions = state.split(range(math.ceil(self.num_rows / self.batch_size)))
        if len(positions) == 0:
            return range(0)
        return range(positions[0] * self.batch_size, min((positions[-1] + 1) * self.batch_size, self.num_rows))

    def num_examples(self, state: DistributedState) -> int:
        """Count the examples that `state`'s process reads, for its progress bar."""
        return len(self.rows(state))

    def __call__(self, state: DistributedState) -> Iterator[Batch]:
        rows = self.rows(state)
        if len(rows) == 0:
            return
        yield from self.read_rows(rows)


class DatasetShards(RowRangeShards):
    """The `shard_batches` of an evaluation set read from a `datasets.Dataset` (see `dataset_shard_batches`)."""

    def __init__(self, make_batches: Callable[[object], Iterable[Batch]], dataset, batch_size: int):
        super().__init__(self._read_dataset_rows, len(dataset), batch_size)
        self.make_batches = make_batches
        self.dataset = dataset

    def _read_dataset_rows(self, rows: range) -> Iterator[Batch]:
        for pixel_values, labels, indices in self.make_batches(self.dataset.select(rows)):
            yield pixel_values, labels, indices + rows.start


def dataset_shard_batches(
    make_batches: Callable[[object], Iterable[Batch]], dataset, batch_size: int
) -> DatasetShards:
    """Build the `shard_batches` of an evaluation set read from a `datasets.Dataset`.

    The set's batch positions are split with `DistributedState.split`, and each process reads only its block of
    whole batches through `make_batches(dataset.select(rows))`; the yielded indices are shifted back to rows of
    `dataset`. When no image is skipped, the batches are exactly those of a single-process run.

    Args:
        make_batches (`Callable`): Yields `(pixel_values, labels, indices)` batches of `batch_size` images of the
            dataset it is given, with `indices` relative to that dataset (as `iter_image_batches` does).
        dataset (`datasets.Dataset`): The whole evaluation set.
        batch_size (`int`): Images per batch, the same as `make_batches` uses.

    Returns:
        [`DatasetShards`]: Called as `shard_batches(state)`; `num_examples(state)` counts that process's examples.
    """
    return DatasetShards(make_batches, dataset, batch_size)


def _describe_existing_group() -> None:
    """Tell Accelerate about a process group that the caller initialised without a launcher.

    Accelerate reads the launch from environment variables; a group set up with `dist.init_process_group` and an
    explicit rank has none. Single-host values are filled in, and `OMP_NUM_THREADS` is set to the current thread
    count so that Accelerate keeps it.
    """
    world_size = dist.get_world_size()
    for name, value in (
        ("RANK", dist.get_rank()),
        ("WORLD_SIZE", world_size),
        ("LOCAL_RANK", dist.get_rank()),
        ("LOCAL_WORLD_SIZE", world_size),
        ("OMP_NUM_THREADS", torch.get_num_threads()),
    ):
        os.environ.setdefault(name, str(value))


def is_main_launch_process() -> bool:
    """Return whether this process is rank 0 of its launch (`RANK` as torchrun and accelerate set it), or alone.

    Unlike `DistributedState.is_main_process`, this reads only the environment, so it also works before the
    process group exists.
    """
    return int(os.environ.get("RANK", "0")) == 0


def _warn_if_launch_started_one_process() -> None:
    """Warn if `accelerate launch --cpu --num_processes N` (N > 1) started this process alone.

    accelerate 1.16 then starts one process without `WORLD_SIZE`, but still sets `MASTER_ADDR` for the processes
    that were requested.
    """
    requested_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true"
    if requested_cpu and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        logger.warning(
            "accelerate launch --cpu started this evaluation as a single process, although --num_processes requested "
            "more. accelerate starts several processes on CPUs with --multi_gpu in place of --cpu (they use gloo "
            "when there is no GPU), so launch again that way to split the sets across processes."
        )


def get_distributed_state() -> DistributedState:
    """Return the state of the current launch; a multi-process launch gets an `accelerate.Accelerator`.

    A single process (no `WORLD_SIZE` above 1 and no initialised process group) gets rank 0 of 1 and no
    accelerator. Under `accelerate launch` or `torchrun`, or in a process group the caller initialised, an
    `Accelerator` joins (or sets up) the group: NCCL when CUDA is available, else gloo on the CPU.

    NOTE: only the gloo path has been run (the tests launch two CPU processes); NCCL on GPUs is untested.
    """
    initialised = dist.is_available() and dist.is_initialized()
    if not initialised and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        _warn_if_launch_started_one_process()
        return DistributedState()
    if initialised:
        _describe_existing_group()
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.num_processes <= 1:
        return DistributedState()
    return DistributedState(accelerator=accelerator)

"""Data-parallel evaluation over processes started by a launcher (accelerate launch, torchrun).

Nothing here starts processes: `accelerate launch --multi_gpu --num_processes N -m deepthink eval ...`
(or torchrun, or accelerate's multi-node flags) runs the same command N times, and each process asks
accelerate which one it is. Units (model, task, seed) are divided among the processes; with fewer units
than processes every process prepares each unit's methods (deterministic, so all agree) and scores its
share of the eval items, which are gathered on the main process. Only the process that owns a unit
writes it; the main process writes the report once every unit is there.
"""
from __future__ import annotations

import os
from contextlib import contextmanager


def launched() -> bool:
    """Whether this process was started by a multi-process launcher."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class Processes:
    """This process's place among the launched ones (rank 0 of 1 when not launched)."""

    def __init__(self, device: str = "cpu"):
        self.state = None
        self.rank, self.size, self.local_rank = 0, 1, 0
        if launched():
            from accelerate import PartialState

            # on CPUs accelerate sets up gloo only when asked for CPU processes
            self.state = PartialState(cpu=not str(device).startswith(("cuda", "auto")))
            self.rank, self.size = self.state.process_index, self.state.num_processes
            self.local_rank = self.state.local_process_index

    def alone(self) -> "Processes":
        """This process as if it were the only one, for work its caller has already divided (a whole unit per
        process): it divides and gathers nothing, but keeps its own GPU and its share of the CPU cores."""
        solo = Processes.__new__(Processes)
        solo.state, solo.rank, solo.size, solo.local_rank = None, 0, 1, self.local_rank
        solo.device, solo.threads = self.device, self.threads          # this process's placement, not rank 0's
        return solo

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """`cuda` means this process's own GPU when launched (cuda:LOCAL_RANK); anything else is kept."""
        return f"cuda:{self.local_rank}" if self.size > 1 and str(device) == "cuda" else device

    def threads(self, requested: int | None) -> int | None:
        """CPU threads per process: the physical cores shared among the processes on this machine, unless
        set explicitly."""
        if requested is not None or self.size == 1:
            return requested
        from ..models import physical_cores

        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", self.size))
        return max(1, physical_cores() // per_machine)

    def close(self) -> None:
        """Leave the process group once every process has got here, so that each exits cleanly whatever its share
        of the work (none, in a resumed run whose units are all written); nothing when not launched. Only for the
        normal path: after an error in one process the others would wait here for ever, and the launcher ends
        them instead."""
        if self.state is not None:
            self.barrier()
            self.state.destroy_process_group()
            self.state = None

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, error_type, *_) -> None:
        if error_type is None:
            self.close()

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def broadcast(self, obj):
        """The main process's `obj`, on every process."""
        if self.state is None:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj], from_process=0)[0]

    def gather(self, obj) -> list:
        """Every process's `obj`, in rank order, on every process."""
        if self.state is None:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    @contextmanager
    def main_first(self):
        """The main process runs the block first (e.g. to fill a model cache), then the others."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

"""Work divided among the processes of an `accelerate launch` (or one process), and the results gathered.

Work items are numbered; process r takes items r, r + P, r + 2P, ... and every item carries its own seed, so the
gathered results, put back in item order, do not depend on the number of processes P.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Processes:
    """This process's rank among `world` processes; `gather` collects a list from every process (all ranks get it)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, items: list) -> list:
        return items[self.rank :: self.world]

    def gather(self, items: list) -> list:
        if self.world == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(list(items))

    def barrier(self) -> None:
        if self.world > 1:
            accelerate_state().wait_for_everyone()


def current_processes(distributed: bool = True) -> Processes:
    """The processes of this launch (accelerate's PartialState), or this one alone when `distributed` is False
    (e.g. training's periodic evaluation, which runs on the main process only)."""
    if not distributed:
        return Processes()
    state = accelerate_state()
    return Processes(state.process_index, state.num_processes)


def accelerate_state():
    """accelerate's PartialState; on CPUs under `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu` it must be
    told so (only the full AcceleratorState reads that variable), or each process runs alone."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def close_process_group() -> None:
    """Close this launch's process group once every process has finished its work. gloo's threads, left to the
    interpreter's exit, can abort it ("terminate called without an active exception", exit -6). Only after success:
    after an error another process may still be inside a collective, and the close would wait for it."""
    accelerate_state().destroy_process_group()  # accelerate's: nothing to do where no group was made (one process)

"""Two CPU processes joined by torch.distributed's gloo backend, for the data-parallel tests."""

import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    """A free TCP port on the loopback interface for the processes' rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank: int, world: int, port: int) -> None:
    """Join the gloo process group at ``127.0.0.1:port`` with one intra-op thread."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)


def leave(rank: int, results, out_file: str) -> None:
    """Rank 0 saves ``results`` to ``out_file``; every process then leaves the group."""
    if rank == 0:
        torch.save(results, out_file)
    dist.barrier()
    dist.destroy_process_group()

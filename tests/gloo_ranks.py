"""Run a function on gloo ranks: each rank a spawned process with the default process group initialised on a
free loopback port, torn down after. A module of its own, like `ports` (sub-folders have their conftest)."""

import os

import torch.multiprocessing as mp

from ports import free_port


def run_gloo_ranks(fn, world_size: int, *, timeout_s: float = 120.0) -> dict:
    """{rank: fn(rank)} from every rank. `fn`: a module-level function (spawn pickles it by reference)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, rank, world_size, port, out)) for rank in range(world_size)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=timeout_s) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return results


def _rank_main(fn, rank: int, world_size: int, port: int, out) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        out.put((rank, fn(rank)))
    finally:
        dist.destroy_process_group()

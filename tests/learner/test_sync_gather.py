"""The weight sync's gather over FSDP2 shards: each shard is cast to the sync dtype before the gather (half the
bytes for bf16) and the whole tensors equal the unsharded model's, cast, including shards of uneven rows."""

import os

import torch
import torch.multiprocessing as mp

from ports import free_port


def _rank(rank: int, port: int, out) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from learner.sync import _full_tensors

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))  # 5 and 3 rows: uneven shards
        reference = {k: v.clone() for k, v in model.state_dict().items()}
        fully_shard(model)
        assert all(isinstance(t, DTensor) for t in model.state_dict().values())
        whole = list(_full_tensors(model.state_dict(), torch.bfloat16))
        equal = [t.dtype == torch.bfloat16 and torch.equal(t, r.to(torch.bfloat16)) for r, t in zip(reference.values(), whole)]
        out.put((rank, equal))
    finally:
        dist.destroy_process_group()


def test_shards_cast_then_gathered_equal_the_whole_model_cast():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == {0: [True] * 4, 1: [True] * 4}

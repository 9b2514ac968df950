"""The weight sync's gather over FSDP2 shards: each shard is cast to the sync dtype before the gather (half the
bytes for bf16) and the whole tensors equal the unsharded model's, cast, including shards of uneven rows."""

import torch
from gloo_ranks import run_gloo_ranks


def _gathered_equal(rank: int) -> list[bool]:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from learner.sync import _full_tensors

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))  # 5 and 3 rows: uneven shards
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    fully_shard(model)
    assert all(isinstance(t, DTensor) for t in model.state_dict().values())
    whole = list(_full_tensors(model.state_dict(), torch.bfloat16))
    return [t.dtype == torch.bfloat16 and torch.equal(t, r.to(torch.bfloat16)) for r, t in zip(reference.values(), whole)]


def test_shards_cast_then_gathered_equal_the_whole_model_cast():
    assert run_gloo_ranks(_gathered_equal, 2) == {0: [True] * 4, 1: [True] * 4}


def _one_rank_local_source(rank: int) -> tuple:
    from torch.distributed.fsdp import fully_shard

    from learner.sync import WeightBroadcaster

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    fully_shard(model)
    sender = WeightBroadcaster(receivers=[], rank=0, backend="gloo", timeout_s=5, bucket_bytes=1 << 20,
                               dtype=torch.bfloat16, device=torch.device("cpu"), transport="ipc")
    first, tensors = sender._local_source(model, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 7)).sum().backward()
    optimizer.step()  # in place: the kept tensors now hold the new values
    second, kept = sender._local_source(model, 2)
    now = [t.full_tensor() for t in model.state_dict().values()]
    same = kept is tensors and all(torch.equal(a, b) for a, b in zip(kept, now))
    with torch.no_grad():  # the storage replaced (as a load with assign=True would): taken again
        model[0].weight._local_tensor = model[0].weight._local_tensor.clone() + 1
    _, again = sender._local_source(model, 3)
    return (second.version, first.names == second.names, same, again is not tensors,
            torch.equal(again[0], model[0].weight.full_tensor()))


def test_one_rank_local_source_is_taken_once_and_follows_the_optimizer_and_a_moved_storage():
    assert run_gloo_ranks(_one_rank_local_source, 1) == {0: (2, True, True, True, True)}

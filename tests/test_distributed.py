"""distributed.py: epoch sharding (pure), and a real 2-process gloo group started by torchrun.

The group test runs this file as the worker (`torchrun --nproc_per_node 2 tests/test_distributed.py --worker
DIR`): each rank writes what it saw to DIR/rank<r>.json and the tests below assert on those files.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distributed import (DistributedContext, no_sync, shard_batch_plan, shard_items,  # noqa: E402
                         steps_per_epoch, unwrap_model, wrap_model)
from errors import UserError  # noqa: E402

WORLD_SIZE = 2
# A plan of 11 batches of mixed sizes (as length-grouped or token-packed epochs produce): odd, so the last
# round is split.
PLAN = [[0, 1, 2], [3], [4, 5], [6, 7, 8, 9], [10], [11, 12], [13], [14, 15, 16], [17], [18, 19], [20, 21, 22]]


# ---------------------------------------------------------------- sharding (pure functions)

def samples_of(batches: list[list[int]]) -> list[int]:
    return [i for batch in batches for i in batch]


def repeated_samples(plan: list[list[int]], world_size: int) -> int:
    """Samples the shards of all ranks train more than once in the epoch."""
    shards = [shard_batch_plan(plan, rank, world_size) for rank in range(world_size)]
    return len(samples_of([batch for shard in shards for batch in shard])) - len(samples_of(plan))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_are_disjoint_cover_the_epoch_and_have_equal_step_counts(world_size: int) -> None:
    shards = [shard_batch_plan(PLAN, rank, world_size) for rank in range(world_size)]
    assert {len(shard) for shard in shards} == {steps_per_epoch(len(PLAN), world_size)}
    seen = [i for shard in shards for i in samples_of(shard)]
    assert sorted(seen) == sorted(samples_of(PLAN))  # every sample once, none twice
    assert all(batch for shard in shards for batch in shard)  # no empty batch to trip the step
    assert repeated_samples(PLAN, world_size) == 0


@pytest.mark.parametrize("world_size", [5, 8])
def test_a_last_round_with_fewer_samples_than_ranks_repeats_the_first_batches(world_size: int) -> None:
    shards = [shard_batch_plan(PLAN, rank, world_size) for rank in range(world_size)]
    assert {len(shard) for shard in shards} == {steps_per_epoch(len(PLAN), world_size)}
    seen = samples_of([batch for shard in shards for batch in shard])
    assert set(seen) == set(samples_of(PLAN))
    # the missing batches repeat the plan's first ones: fewer than world_size of them
    repeated = next(n for n in range(world_size) if len(samples_of(PLAN[:n])) == repeated_samples(PLAN, world_size))
    assert 0 < repeated < world_size
    assert len(seen) - len(samples_of(PLAN)) == len(samples_of(PLAN[:repeated]))


def test_round_robin_order_matches_one_device_with_accumulation() -> None:
    # After k steps on every rank, exactly the plan's first k * world_size batches are done.
    shards = [shard_batch_plan(PLAN, rank, 2) for rank in range(2)]
    for step in range(len(PLAN) // 2):
        assert [shards[0][step], shards[1][step]] == PLAN[2 * step:2 * step + 2]


def test_split_pieces_never_merge_samples_of_different_batches() -> None:
    plan = [[0, 1], [2, 3, 4], [5, 6]]  # on 4 ranks all three are the last round: split into 4 pieces
    pieces = [shard_batch_plan(plan, rank, 4)[-1] for rank in range(4)]
    owners = {i: b for b, batch in enumerate(plan) for i in batch}
    assert all(len({owners[i] for i in piece}) == 1 for piece in pieces)
    assert sorted(samples_of(pieces)) == list(range(7))


def test_batch_size_one_remainder_repeats_at_most_world_size_minus_one_batches() -> None:
    plan = [[i] for i in range(10)]  # like --batch-size 1 with 10 samples on 4 ranks: 2 left over
    shards = [shard_batch_plan(plan, rank, 4) for rank in range(4)]
    assert {len(shard) for shard in shards} == {3}
    seen = samples_of([batch for shard in shards for batch in shard])
    assert set(seen) == set(range(10))
    assert len(seen) - 10 == repeated_samples(plan, 4) == 2


def test_the_guides_epoch_splits_evenly_on_two_and_eight_gpus() -> None:
    plan = [[i] for i in range(3232)]
    for world_size in (2, 8):
        shards = [shard_batch_plan(plan, r, world_size) for r in range(world_size)]
        assert sum(len(s) for s in shards) == 3232 and repeated_samples(plan, world_size) == 0


def test_bad_rank_is_a_bug_not_a_silent_empty_share() -> None:
    with pytest.raises(ValueError):
        shard_batch_plan(PLAN, 2, 2)


def test_evaluation_shards_cover_the_items_once() -> None:
    items = list(range(7))
    parts = [shard_items(items, DistributedContext(rank=r, world_size=3)) for r in range(3)]
    assert sorted(i for part in parts for i in part) == items


# ---------------------------------------------------------------- one process: everything is a no-op

def test_without_torchrun_the_context_is_a_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = DistributedContext.from_env(torch.device("cpu"))
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.is_distributed, ctx.backend) == (0, 1, True, False, None)
    assert ctx.all_reduce_sum(3.0) == 3.0 and ctx.all_reduce_mean([1.0, 2.0]) == [1.0, 2.0]
    assert torch.equal(ctx.all_reduce_sum(torch.tensor([1, 2])), torch.tensor([1, 2]))
    assert ctx.gather_objects({"a": 1}) == [{"a": 1}] and ctx.broadcast_object("x") == "x"
    assert ctx.any_true(False) is False and ctx.any_true(True) is True
    model = torch.nn.Linear(2, 2)
    assert wrap_model(model, ctx) is model and unwrap_model(model) is model
    with no_sync(model, sync=False):
        pass
    ctx.barrier()
    ctx.cleanup()


def test_more_local_ranks_than_gpus_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="--nproc_per_node 1"):
        DistributedContext.from_env(torch.device("cuda"))


# ---------------------------------------------------------------- a real gloo group under torchrun

@pytest.fixture(scope="module")
def group_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}",
         __file__, "--worker", str(out)],
        capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    return {"ranks": ranks, "stdout": proc.stdout}


def test_group_starts_with_gloo_and_knows_its_ranks(group_results: dict) -> None:
    ranks = group_results["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" for r in ranks)
    assert [r["is_main"] for r in ranks] == [True, False]


def test_ranks_train_disjoint_shares_covering_the_epoch(group_results: dict) -> None:
    shares = group_results["ranks"][0]["gathered_shares"]
    assert group_results["ranks"][1]["gathered_shares"] == shares  # every rank gets the same gather
    first, second = (set(samples_of(s)) for s in shares)
    assert not first & second
    assert first | second == set(samples_of(PLAN))
    assert len(shares[0]) == len(shares[1])


def test_ddp_gradient_equals_the_single_process_gradient_of_the_global_batch(group_results: dict) -> None:
    for rank in group_results["ranks"]:
        assert rank["grad_max_abs_diff"] < 1e-5, rank
        assert rank["grad_max_abs"] > 1e-3  # the comparison is not between zeros
    # After one optimizer step the replicas are still identical.
    assert group_results["ranks"][0]["param_checksum"] == group_results["ranks"][1]["param_checksum"]


def test_collectives_return_the_same_on_every_rank(group_results: dict) -> None:
    for rank in group_results["ranks"]:
        assert rank["sum"] == 3.0 and rank["mean"] == 1.5
        assert rank["sum_list"] == [3.0, 1.0] and rank["sum_tensor"] == [3, 30]
        assert rank["any_true"] is True and rank["broadcast"] == "from rank 0"
        assert rank["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert rank["eval_merged"] == list(range(5))


def test_only_rank_zero_prints(group_results: dict) -> None:
    assert group_results["stdout"].count("printed once by the main rank") == 1


def _worker(out: Path) -> None:
    """One rank of the group test (run by torchrun): write what this rank saw to out/rank<r>.json."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.set_num_threads(1)
    with DistributedContext.from_env(torch.device("cpu")) as ctx:
        result: dict = {"rank": ctx.rank, "world_size": ctx.world_size, "backend": ctx.backend,
                        "is_main": ctx.is_main}
        result["gathered_shares"] = ctx.gather_objects(shard_batch_plan(PLAN, ctx.rank, ctx.world_size))

        # DDP: each rank takes half of a global batch of 4 equal-length samples; the averaged gradient must be
        # the gradient of the mean loss over all 4 computed in one process.
        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = Qwen2ForCausalLM(config)
        reference = copy.deepcopy(model)
        ids = torch.randint(0, 16, (4, 12), generator=torch.Generator().manual_seed(1))
        reference(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        ddp = wrap_model(model, ctx)
        mine = ids[2 * ctx.rank:2 * ctx.rank + 2]
        ddp(input_ids=mine, labels=mine, use_cache=False).loss.backward()
        pairs = [(p.grad, q.grad) for p, q in zip(unwrap_model(ddp).parameters(), reference.parameters())]
        result["grad_max_abs_diff"] = max((a - b).abs().max().item() for a, b in pairs)
        result["grad_max_abs"] = max(b.abs().max().item() for _, b in pairs)
        torch.optim.SGD(ddp.parameters(), lr=0.1).step()
        result["param_checksum"] = sum(p.double().sum().item() for p in unwrap_model(ddp).parameters())

        result["sum"] = ctx.all_reduce_sum(float(ctx.rank + 1))
        result["mean"] = ctx.all_reduce_mean(float(ctx.rank + 1))
        result["sum_list"] = ctx.all_reduce_sum([ctx.rank + 1.0, 0.5])
        result["sum_tensor"] = ctx.all_reduce_sum(torch.tensor([ctx.rank + 1, 10 * (ctx.rank + 1)])).tolist()
        result["any_true"] = ctx.any_true(ctx.rank == 1)
        result["broadcast"] = ctx.broadcast_object(f"from rank {ctx.rank}")
        result["gathered"] = ctx.gather_objects({"rank": ctx.rank})
        result["eval_merged"] = sorted(i for part in ctx.gather_objects(shard_items(list(range(5)), ctx))
                                       for i in part)
        ctx.print("printed once by the main rank")
        ctx.barrier()
        (out / f"rank{ctx.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    from errors import run_cli
    run_cli(lambda: _worker(Path(sys.argv[2])))

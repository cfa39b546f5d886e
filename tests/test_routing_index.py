"""The router's prefix index and placement, without Ray.

`KVEventLog` is fed by a real offline engine under a random, evicting workload, and a
`PrefixIndex` that loses replies at random still converges to the engine's exact set of
cached block hashes. Placement: prefix affinity, the imbalance fallback, the comparison
policies, and O(prompt blocks) matching over pending placements.
"""

from __future__ import annotations

import random

import torch

from raysvc.block_hash import hash_blocks
from raysvc.cluster.messages import WorkerInfo
from raysvc.cluster.placement import PlacementConfig, Placer, WorkerEntry
from raysvc.cluster.prefix_index import KVEventLog, PrefixIndex


def test_index_follows_engine_events_through_lost_replies_and_overflow():
    from raysvc import LLM, SamplingParams

    torch.set_num_threads(1)
    rng = random.Random(0)
    llm = LLM(num_kv_blocks=24, max_num_seqs=4)
    log = KVEventLog(max_batches=6)  # small: some polls come too late and get a snapshot
    llm.engine.subscribe_kv_events(log.record)
    index = PrefixIndex()
    groups = [[rng.randrange(3, 400) for _ in range(40)] for _ in range(3)]
    for _ in range(6):
        prompts = [rng.choice(groups) + [rng.randrange(3, 400) for _ in range(rng.randrange(
            1, 40))] for _ in range(rng.randrange(1, 5))]
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=rng.randrange(1, 20),
                                             ignore_eos=True))
        reply = log.since(index.epoch, index.step)
        if rng.random() < 0.7:  # else the reply is lost on the way: the log keeps it
            index.apply(reply)
    index.apply(log.since(index.epoch, index.step))
    assert index.cached == llm.engine.cached_block_hashes() == log.cached()
    assert index.cached and len(index.cached) <= 24
    index.apply(log.since(index.epoch, index.step))  # a repeated poll changes nothing
    assert index.cached == llm.engine.cached_block_hashes()


def test_new_epoch_gets_a_snapshot():
    log, index = KVEventLog(), PrefixIndex()
    index.apply(log.since(index.epoch, index.step))
    assert index.epoch == log.epoch
    restarted = KVEventLog()  # a restarted worker: new epoch, empty cache
    reply = restarted.since(index.epoch, index.step)
    assert reply.snapshot == set() and reply.epoch == restarted.epoch


def _worker(wid: str, blocks: int = 1000, seqs: int = 8) -> WorkerEntry:
    info = WorkerInfo(wid, "node", 1, "cpu", "m", 512, 100, 16, blocks, seqs)
    return WorkerEntry(info, None, seqs, PrefixIndex())


def _admit(w: WorkerEntry, hashes: list[bytes], tokens: int = 160) -> None:
    blocks, seqs = w.need(tokens, 1)
    w.used_blocks += blocks
    w.used_seqs += seqs
    w.requests_routed += 1
    w.index.place(hashes)


def test_prefix_policy_follows_the_cache_until_load_is_out_of_balance():
    workers = [_worker(f"w{i}") for i in range(3)]
    placer = Placer(PlacementConfig(balance_abs=2, balance_rel=1.5))
    a = hash_blocks(list(range(3, 163)), 16)
    b = hash_blocks(list(range(200, 360)), 16)
    first, _ = placer.choose(workers, workers, a)
    assert first.worker_id == "w0"  # idle cluster: deterministic tie-break
    _admit(first, a)
    again, matched = placer.choose(workers, workers, a)
    assert again is first and matched == len(a)  # pending placement counts at once
    other, matched = placer.choose(workers, workers, b)
    assert other is not first and matched == 0
    _admit(first, a)
    _admit(first, a)
    _admit(first, a)  # w0: 4 requests, others 0: out of balance -> least loaded
    fallback, _ = placer.choose(workers, workers, a)
    assert fallback is not first


def test_full_prefix_worker_is_waited_for_unless_it_runs_hot():
    workers = [_worker(f"w{i}", seqs=2) for i in range(2)]
    placer = Placer(PlacementConfig(balance_abs=2, balance_rel=1.5))
    a = hash_blocks(list(range(3, 163)), 16)
    _admit(workers[0], a)
    _admit(workers[0], a)  # w0 holds the prefix and is full
    assert placer.choose(workers, workers[1:], a) == (None, 0)  # wait for w0
    assert Placer(PlacementConfig(wait_for_prefix=False)).choose(
        workers, workers[1:], a)[0] is workers[1]
    _admit(workers[0], a)  # w0 now runs hot: 3 vs 0 requests
    assert placer.choose(workers, workers[1:], a)[0] is workers[1]


def test_lora_affinity_gathers_an_adapter_unless_its_worker_runs_hot():
    """A cold prompt for adapter X goes where X is loaded, not to the least loaded worker;
    a prefix match (hashed with X) still counts; a hot worker gives way."""
    workers = [_worker(f"w{i}") for i in range(3)]
    placer = Placer(PlacementConfig(balance_abs=2, balance_rel=1.5))
    workers[2].loras = {"x"}
    cold = hash_blocks(list(range(3, 163)), 16, lora_name="x")
    assert placer.choose(workers, workers, cold, lora="x")[0] is workers[2]
    assert placer.choose(workers, workers, cold)[0] is workers[0]  # base: least loaded
    assert placer.choose(workers, workers, [], lora="x")[0] is workers[2]  # < one block
    # the adapter's prefix on another worker beats a bare adapter hit
    warm = hash_blocks(list(range(500, 900)), 16, lora_name="x")
    _admit(workers[1], warm)
    assert placer.choose(workers, workers, warm, lora="x")[0] is workers[1]
    for _ in range(3):  # w2 runs hot (4 vs 0-1 requests): the least loaded takes it
        _admit(workers[2], [])
    _admit(workers[2], [])
    assert placer.choose(workers, workers, cold, lora="x")[0] is workers[0]
    # the adapter's blocks never match the base model's (nor another adapter's)
    assert not set(hash_blocks(list(range(3, 163)), 16)) & set(cold)


def test_a_busy_holder_gives_way_to_a_worker_that_pulls_only_when_pulling_is_faster():
    """The least loaded worker takes a request whose prefix a busy worker holds; the ticket
    names the holder as the pull source iff the taker's cost model says a pull of those
    blocks beats recomputing them."""
    from raysvc.cluster.messages import WorkerLoad
    from raysvc.cluster.placement import pull_cost

    workers = [_worker(f"w{i}") for i in range(2)]
    for w in workers:
        w.info.kv_bytes_per_block = 50_000
    placer = Placer(PlacementConfig(balance_abs=2, balance_rel=1.5))
    prefix = hash_blocks(list(range(3, 323)), 16)  # 20 blocks
    for _ in range(4):
        _admit(workers[0], prefix)  # w0 holds it and runs hot
    # slow prefill (1k tok/s: 320 ms for 20 blocks), fast transfer (1 GB/s: 6 ms): pull
    workers[1].pull_cost = pull_cost(workers[1].info, WorkerLoad(
        prefill_tokens_per_s=1_000, kv_bytes_per_s=1e9, pull_overhead_s=0.005))
    pick, matched = placer.choose(workers, workers, prefix)
    assert pick is workers[1] and matched == 0
    assert placer.pull == (workers[0], len(prefix))
    # fast prefill (1M tok/s), slow transfer: recompute, no pull
    workers[1].pull_cost = pull_cost(workers[1].info, WorkerLoad(
        prefill_tokens_per_s=1e6, kv_bytes_per_s=1e6, pull_overhead_s=0.005))
    assert placer.choose(workers, workers, prefix)[0] is workers[1] and placer.pull is None
    # no cost model reported yet: no pull
    workers[1].pull_cost = pull_cost(workers[1].info, WorkerLoad())
    assert workers[1].pull_cost is None
    assert placer.choose(workers, workers, prefix)[0] is workers[1] and placer.pull is None


def test_a_handed_over_request_pulls_from_the_worker_it_avoids():
    """A request handed over by a (draining, or shedding) worker is never placed back on
    it, yet that worker holds its prefix: the ticket names it as the pull source."""
    from raysvc.cluster.messages import WorkerLoad
    from raysvc.cluster.placement import pull_cost

    workers = [_worker(f"w{i}") for i in range(3)]
    for w in workers:
        w.info.kv_bytes_per_block = 50_000
        w.pull_cost = pull_cost(w.info, WorkerLoad(
            prefill_tokens_per_s=1_000, kv_bytes_per_s=1e9, pull_overhead_s=0.005))
    placer = Placer(PlacementConfig())
    prefix = hash_blocks(list(range(3, 323)), 16)
    _admit(workers[0], prefix)
    others = workers[1:]
    pick, matched = placer.choose(others, others, prefix, avoided=workers[0])
    assert pick in others and matched == 0 and placer.pull == (workers[0], len(prefix))
    assert placer.choose(others, others, prefix)[0] in others and placer.pull is None


def test_comparison_policies():
    workers = [_worker(f"w{i}") for i in range(4)]
    hashes = [hash_blocks([g] * 48, 16) for g in range(8)]
    rr = Placer(PlacementConfig(policy="round_robin"))
    assert [rr.choose(workers, workers, hashes[0])[0].worker_id for _ in range(5)] == [
        "w0", "w1", "w2", "w3", "w0"]
    oracle = Placer(PlacementConfig(policy="oracle"))
    owners = [oracle.choose(workers, workers, hashes[g])[0].worker_id for g in range(8)]
    assert owners == ["w0", "w1", "w2", "w3"] * 2
    assert oracle.choose(workers, workers, hashes[5])[0].worker_id == "w1"
    assert oracle.choose(workers, workers[:1], hashes[5])[0] is None  # its worker is full
    ll = Placer(PlacementConfig(policy="least_loaded"))
    _admit(workers[0], hashes[0])
    assert ll.choose(workers, workers, hashes[0])[0].worker_id == "w1"


def test_pending_is_bounded_and_expires():
    index = PrefixIndex(max_pending=4, pending_ttl_s=10)
    hashes = hash_blocks(list(range(3, 99)), 16)  # 6 blocks
    index.place(hashes, now=0.0)
    assert len(index.pending) == 4 and index.match(hashes, now=1.0) == 0  # head evicted
    index.place(hashes[:3], now=0.0)
    assert index.match(hashes, now=1.0) == 3 and index.match(hashes, now=11.0) == 0

"""Chaos and soak harness: greedy streams against a server while its processes are killed.

    raysvc bench chaos                                    # local server, 2 minutes of chaos
    raysvc bench chaos --duration 300 --kill-every 8 --soak-minutes 20

Phase 1 (undisturbed): every prompt of the workload once, greedy; their texts are the
reference. Phase 2 (chaos, `--duration` s): `--streams` concurrent greedy streams, each a
random prompt of the workload; at random times (every `--kill-every` s on average) a
random process of the server is SIGKILLed — a worker, the router, the cluster replica, an
ingress replica, a draft actor (`--targets`) — and `--hangup-rate` of the clients hang up
mid-stream. Every request is classified against the reference: ok, changed (wrong text),
cut (the connection dropped after 200: lost, unless an ingress replica died within the
previous few seconds — a replica's death cuts its own connections, by design), error
(an error event inside the stream, or an error status: lost), refused (429/503 before the
stream: the client may retry), hung up (by the client). Serve 2.60's HTTP proxy answers a
request whose replica died before the response began with a plain 500; right after an
ingress replica's death those are counted apart, like its cut streams. Then: KV blocks
still held and requests still admitted on every worker, once the load stopped.

Phase 2b (bad input, `--bad-input-duration` s, no kills): the same greedy streams while
one more client sends, over and over, every kind of request that once hurt others
(`BAD_REQUESTS`: NaN/Infinity floats, a top_k or seed past int64, stop ids outside the
vocabulary, too many stop strings, a huge regex, ...). Each must be refused with a 4xx
naming its field (or, for the valid edge cases, answered 200); no worker process may be
lost to them; every other stream must complete with its reference text.

Phase 3 (soak, `--soak-minutes`, no kills, steady load): RSS of every server process
each 30 s; growth from minute 5 to the end is reported per process (the first minutes are
warm-up: allocator arenas, caches and torch's lazy state grow there, which is not a leak;
a leak keeps growing after).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

TARGETS = {"worker": "LLMWorker", "router": "Router",
           "cluster": "ServeReplica:raysvc:RaysvcCluster",
           "ingress": "ServeReplica:raysvc:OpenAIIngress", "draft": "DraftActor"}
INGRESS_CUT_WINDOW_S = 5.0


def processes(root: int) -> dict[int, str]:
    """pid -> title of the Ray processes descending from `root` (`ray::X` titles)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            try:
                title = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0].decode()
            except OSError:
                continue
            if title.startswith("ray::"):
                found[child] = title[5:].split(".")[0].split(" ")[0]
    return found


def rss_mb(pid: int, kind: str = "VmRSS") -> float | None:
    """Resident MB of `pid`: all of it (VmRSS), or its private part (RssAnon: without the
    shared pages of Ray's object store that it has read, or mapped files)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(kind + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass
class Outcomes:
    counts: dict[str, int] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, code: object, detail: str = "") -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.codes[str(code)] = self.codes.get(str(code), 0) + 1
        if detail and kind not in ("ok", "hung up"):
            self.examples.setdefault(kind, detail[:300])


async def stream(session, url: str, prompt: str, max_tokens: int,
                 hang_up_after: int | None = None) -> tuple[str, object, str]:
    """(kind, HTTP status, text or detail) of one greedy streaming completion."""
    import aiohttp

    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "ignore_eos": True}
    text, events = "", 0
    try:
        async with session.post(url + "/v1/completions", json=body) as r:
            if r.status != 200:
                return "refused" if r.status in (429, 503) else "error", r.status, await r.text()
            async for line in r.content:
                line = line.decode().strip()
                if not line.startswith("data: {"):
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    return "error", 200, json.dumps(data)
                text += data["choices"][0]["text"]
                events += 1
                if hang_up_after is not None and events >= hang_up_after:
                    return "hung up", 200, text
            return "done", 200, text
    except (TimeoutError, aiohttp.ClientError) as e:
        return "cut", 200, repr(e)


async def chaos(url: str, root: int, prompts: list[str], reference: dict[str, str],
                args) -> tuple[Outcomes, list[dict]]:
    import aiohttp

    rng = random.Random(args.seed)
    outcomes, kills = Outcomes(), []
    end = time.monotonic() + args.duration
    targets = [TARGETS[t] for t in args.targets.split(",")]

    async def client(session) -> None:
        while time.monotonic() < end:
            prompt = rng.choice(prompts)
            hang = rng.randint(1, 8) if rng.random() < args.hangup_rate else None
            kind, code, text = await stream(session, url, prompt, args.max_tokens, hang)
            recent = any(k["title"] == TARGETS["ingress"]
                         and time.monotonic() - k["at"] < INGRESS_CUT_WINDOW_S for k in kills)
            if kind == "done":
                kind = "ok" if text == reference[prompt] else "changed"
            elif kind == "cut" and recent:
                kind = "cut (its ingress replica died)"
            elif kind == "error" and code == 500 and recent:
                # Serve 2.60's proxy answers 500 for a request whose replica died before
                # the response began (http_util.get_http_response_status: RayActorError)
                kind = "500 from Serve's proxy (its ingress replica died)"
            outcomes.add(kind, code, text)

    async def killer() -> None:
        while True:
            await asyncio.sleep(rng.expovariate(1.0 / args.kill_every))
            if time.monotonic() > end - 5:
                return
            live = [(pid, t) for pid, t in processes(root).items() if t in targets]
            if not live:
                continue
            pid, title = rng.choice(live)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            kills.append({"at": time.monotonic(), "title": title, "pid": pid})
            print(f"  killed {title} (pid {pid})", flush=True)

    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        k = asyncio.create_task(killer())
        await asyncio.gather(*(client(session) for _ in range(args.streams)))
        k.cancel()
    return outcomes, kills


# (name, raw JSON body of /v1/completions, the status it must get)
BAD_REQUESTS: list[tuple[str, bytes, int]] = [
    ("temperature NaN", b'{"model": "tiny", "prompt": "x", "temperature": NaN}', 400),
    ("repetition_penalty Infinity",
     b'{"model": "tiny", "prompt": "x", "repetition_penalty": Infinity}', 400),
    ("presence_penalty -Infinity",
     b'{"model": "tiny", "prompt": "x", "presence_penalty": -Infinity}', 400),
    ("top_k 2^63", b'{"model": "tiny", "prompt": "x", "top_k": 9223372036854775808}', 400),
    ("seed 2^64", b'{"model": "tiny", "prompt": "x", "seed": 18446744073709551616}', 400),
    ("seed 2^64-1, n 2 (valid)", b'{"model": "tiny", "prompt": "x", "n": 2, "max_tokens": 4, '
                                 b'"seed": 18446744073709551615, "temperature": 1}', 200),
    ("stop_token_ids outside the vocabulary, min_tokens 2",
     b'{"model": "tiny", "prompt": "x", "stop_token_ids": [1000000], "min_tokens": 2}', 400),
    ("17 stop strings", json.dumps({"model": "tiny", "prompt": "x",
                                    "stop": [f"s{i}" for i in range(17)]}).encode(), 400),
    ("a 100 kB regex", json.dumps({"model": "tiny", "prompt": "x",
                                   "guided_regex": "(a|b)" * 20000}).encode(), 400),
    ("301 logit_bias entries", json.dumps({"model": "tiny", "prompt": "x", "logit_bias": {
        str(i): 1 for i in range(301)}}).encode(), 400),
    ("a 100k-token prompt", json.dumps({"model": "tiny", "prompt": [5] * 100_000}).encode(),
     400),
]


async def bad_input(url: str, root: int, prompts: list[str], reference: dict[str, str],
                    args) -> tuple[Outcomes, Outcomes, int]:
    """(the streams' outcomes, the bad requests' outcomes, worker processes lost)."""
    import aiohttp

    rng = random.Random(args.seed + 1)
    streams, bad = Outcomes(), Outcomes()
    workers_before = {pid for pid, t in processes(root).items() if t == TARGETS["worker"]}
    end = time.monotonic() + args.bad_input_duration

    async def client(session) -> None:
        while time.monotonic() < end:
            prompt = rng.choice(prompts)
            kind, code, text = await stream(session, url, prompt, args.max_tokens)
            if kind == "done":
                kind = "ok" if text == reference[prompt] else "changed"
            streams.add(kind, code, text)

    async def offender(session) -> None:
        while time.monotonic() < end:
            for name, body, expect in BAD_REQUESTS:
                async with session.post(url + "/v1/completions", data=body,
                                        headers={"Content-Type": "application/json"}) as r:
                    detail = await r.text()
                bad.add("as expected" if r.status == expect else f"{name}: got {r.status}",
                        r.status, detail[:200])

    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(offender(session), *(client(session) for _ in range(args.streams)))
    workers_after = {pid for pid, t in processes(root).items() if t == TARGETS["worker"]}
    return streams, bad, len(workers_before - workers_after)


async def leftovers(url: str, settle_s: float = 60.0) -> list[dict]:
    """Each worker's blocks and requests once the load has stopped (polled until clean)."""
    import aiohttp

    deadline = time.monotonic() + settle_s
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url + "/cluster/stats") as r:
                    rows = (await r.json())["workers"]
            except Exception:
                rows = []
            clean = rows and all(w.get("kv_blocks_free") == w.get("kv_blocks_total")
                                 and not w.get("requests_admitted") for w in rows)
            if clean or time.monotonic() > deadline:
                return [{k: w.get(k) for k in ("worker_id", "state", "kv_blocks_free",
                                               "kv_blocks_total", "requests_admitted",
                                               "requests_in_flight")} for w in rows]
            await asyncio.sleep(1.0)


async def soak(url: str, root: int, prompts: list[str], reference: dict[str, str], args
               ) -> tuple[Outcomes, dict[str, list[tuple[float, float]]]]:
    import aiohttp

    outcomes, series = Outcomes(), {}
    start = time.monotonic()
    end = start + 60 * args.soak_minutes
    rng = random.Random(args.seed + 1)

    async def client(session) -> None:
        while time.monotonic() < end:
            prompt = rng.choice(prompts)
            kind, code, text = await stream(session, url, prompt, args.max_tokens)
            outcomes.add("ok" if kind == "done" and text == reference[prompt] else kind, code,
                         text)

    async def sampler() -> None:
        while time.monotonic() < end:
            minute = (time.monotonic() - start) / 60
            for pid, title in processes(root).items():
                mb = rss_mb(pid)
                if mb is not None:
                    series.setdefault(f"{title} ({pid})", []).append((minute, mb))
            await asyncio.sleep(30)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(sampler(), *(client(session) for _ in range(args.soak_streams)))
    return outcomes, series


def growth(series: dict[str, list[tuple[float, float]]], from_minute: float) -> list[dict]:
    rows = []
    for name, points in sorted(series.items()):
        after = [(m, mb) for m, mb in points if m >= from_minute]
        if len(after) >= 2:
            first, last = after[0][1], after[-1][1]
            rows.append({"process": name, f"rss_mb_at_{from_minute:g}min": round(first, 1),
                         "rss_mb_at_end": round(last, 1),
                         "growth_pct": round(100 * (last - first) / first, 2),
                         "max_mb": round(max(mb for _, mb in points), 1)})
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raysvc bench chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=12, help="concurrent streams")
    p.add_argument("--duration", type=float, default=120, help="seconds of chaos")
    p.add_argument("--kill-every", type=float, default=10, help="mean seconds between kills")
    p.add_argument("--targets", default="worker,router,cluster,ingress,draft")
    p.add_argument("--hangup-rate", type=float, default=0.1)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--request-timeout", type=float, default=300)
    p.add_argument("--bad-input-duration", type=float, default=30,
                   help="seconds of the bad-input phase (0: none)")
    p.add_argument("--soak-minutes", type=float, default=0, help="0: no soak")
    p.add_argument("--soak-streams", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--draft-workers", type=int, default=1)
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import aiohttp

    from raysvc.bench.serve import _free_port
    from raysvc.serve import launcher
    from raysvc.serve.args import ServeArgs

    serve_args = ServeArgs(num_workers=args.num_workers, draft_workers=args.draft_workers,
                           worker_torch_threads=1, draft_torch_threads=1,
                           # float32: bf16's rounding may flip a near-tied argmax between a
                           # continued prompt's prefill and a decode step, which would
                           # read as "changed" here without any fault of the recovery
                           engine={"num_kv_blocks": 512, "max_num_seqs": 32,
                                   "dtype": "float32"})
    url = launcher.start(serve_args, port=_free_port(),
                         num_cpus=args.num_cpus or args.num_workers + args.draft_workers + 1)
    root = os.getpid()
    rng = random.Random(args.seed)
    words = ("list", "dict", "set", "tuple", "str", "bytes", "class", "module", "function",
             "exception", "loop", "file")
    prompts = [f"The {rng.choice(words)} {rng.choice(words)} is" for _ in range(args.prompts)]
    prompts = list(dict.fromkeys(prompts))
    report: dict = {"args": vars(args)}
    try:
        async def undisturbed():
            async with aiohttp.ClientSession() as s:
                return await asyncio.gather(*(stream(s, url, p, args.max_tokens)
                                              for p in prompts))

        ref = asyncio.run(undisturbed())
        assert all(kind == "done" for kind, _, _ in ref), ref
        reference = {p: text for p, (_, _, text) in zip(prompts, ref, strict=True)}
        print(f"chaos: {args.duration:g}s, {args.streams} streams, kill every "
              f"~{args.kill_every:g}s among {args.targets}", flush=True)
        outcomes, kills = asyncio.run(chaos(url, root, prompts, reference, args))
        if args.bad_input_duration:
            print(f"bad input: {args.bad_input_duration:g}s, {len(BAD_REQUESTS)} kinds, "
                  f"beside {args.streams} streams", flush=True)
            bad_streams, bad, workers_lost = asyncio.run(
                bad_input(url, root, prompts, reference, args))
            report.update(bad_input_streams=bad_streams.counts, bad_input=bad.counts,
                          bad_input_examples=bad.examples, workers_lost_to_bad_input=workers_lost)
        left = asyncio.run(leftovers(url))
        lost = outcomes.counts.get("cut", 0) + outcomes.counts.get("error", 0)
        report.update(outcomes=outcomes.counts, http_codes=outcomes.codes,
                      examples=outcomes.examples, kills=[k["title"] for k in kills],
                      lost=lost, changed=outcomes.counts.get("changed", 0), workers_after=left)
        if args.soak_minutes:
            print(f"soak: {args.soak_minutes:g} min, {args.soak_streams} streams", flush=True)
            soaked, series = asyncio.run(soak(url, root, prompts, reference, args))
            report.update(soak_outcomes=soaked.counts, soak_rss=growth(series, 5.0),
                          soak_series=series)
    finally:
        launcher.stop(local=True)

    print(f"command: raysvc bench chaos {' '.join(argv if argv is not None else sys.argv[2:])}")
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs; "
          f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"kills ({len(report['kills'])}): " + ", ".join(
        f"{t} x{report['kills'].count(t)}" for t in sorted(set(report["kills"]))))
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(report["outcomes"].items())))
    print("HTTP codes: " + ", ".join(f"{k}: {v}" for k, v in sorted(report["http_codes"].items())))
    print(f"lost {report['lost']}, changed {report['changed']}")
    if "bad_input" in report:
        print("bad input: " + ", ".join(f"{k} {v}" for k, v in sorted(report["bad_input"].items()))
              + "; beside them, streams: " + ", ".join(
                  f"{k} {v}" for k, v in sorted(report["bad_input_streams"].items()))
              + f"; worker processes lost: {report['workers_lost_to_bad_input']}")
    for k, v in report["examples"].items():
        print(f"  e.g. {k}: {v}")
    print("after the load: " + "; ".join(
        f"{w['worker_id']} {w['kv_blocks_free']}/{w['kv_blocks_total']} blocks free, "
        f"{w['requests_admitted']} admitted" for w in report["workers_after"]))
    if "soak_rss" in report:
        print("soak: " + ", ".join(f"{k} {v}" for k, v in sorted(report["soak_outcomes"].items())))
        print("| process | RSS MB at 5 min | RSS MB at end | growth % | max MB |")
        print("|---|---:|---:|---:|---:|")
        for r in report["soak_rss"]:
            print(f"| {r['process']} | {r['rss_mb_at_5min']} | {r['rss_mb_at_end']} | "
                  f"{r['growth_pct']} | {r['max_mb']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    clean = all(w["kv_blocks_free"] == w["kv_blocks_total"] and not w["requests_admitted"]
                for w in report["workers_after"])
    bad_ok = "bad_input" not in report or (
        set(report["bad_input"]) <= {"as expected"} and not report["workers_lost_to_bad_input"]
        and set(report["bad_input_streams"]) <= {"ok"})
    return 0 if report["lost"] == 0 and report["changed"] == 0 and clean and bad_ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""`GET /metrics` on the API port: raysvc's Prometheus metrics, where vLLM users look.

raysvc records its metrics with `ray.util.metrics` in the processes that see them (the
router: workers, queue, KV, prefix cache, speculation; the ingress: latencies, tokens);
Ray's metrics agent on each node exports them, prefixed `ray_`, on the node's metrics
port (8080 on KubeRay, which a PodMonitor scrapes). This page gathers the `ray_raysvc_*`
families from every live node's agent and merges them into one exposition (a family's
HELP and TYPE once, its samples from every node), so `curl :8000/metrics` shows the same
names a Prometheus scrape of the agents does.
"""

from __future__ import annotations

import asyncio
import logging

logger = logging.getLogger(__name__)

PREFIX = "ray_raysvc_"


def _agents() -> list[str]:
    import ray

    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]


def merge(pages: list[str], prefix: str = PREFIX) -> str:
    """One exposition of the `prefix` families found in `pages` (Prometheus text)."""
    families: dict[str, dict] = {}
    for page in pages:
        family = None
        for line in page.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                name = line.split()[2]
                if not name.startswith(prefix):
                    family = None
                    continue
                family = families.setdefault(name, {"help": "", "type": "", "samples": []})
                family["help" if line.startswith("# HELP") else "type"] = line
            elif line and not line.startswith("#") and family is not None:
                if line.startswith(prefix):
                    family["samples"].append(line)
    out = []
    for name in sorted(families):
        f = families[name]
        out += [x for x in (f["help"], f["type"]) if x] + f["samples"]
    return "\n".join(out) + "\n"


async def metrics_text(timeout_s: float = 5.0) -> str:
    import aiohttp

    urls = await asyncio.to_thread(_agents)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as s:
        async def fetch(url: str) -> str:
            try:
                async with s.get(url) as r:
                    return await r.text()
            except Exception as e:  # one node's agent down: the others still count
                logger.debug("metrics from %s: %r", url, e)
                return ""

        pages = await asyncio.gather(*(fetch(u) for u in urls))
    return merge(list(pages))

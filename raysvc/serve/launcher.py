"""`raysvc serve`: run the application on an embedded local Ray, or on a cluster.

With no address, a private local Ray is started (no dashboard) and torn down on exit;
with `--address`, the app is deployed onto that cluster and deleted on exit.

SIGTERM and SIGINT drain, then stop: the router refuses new requests (503 with
Retry-After, so a load balancer sends them elsewhere) while the requests in flight finish,
for up to `drain_timeout_s`; then the app goes (a local Ray is simply shut down: Serve's
own graceful shutdown waits seconds for nothing when the workers are already idle). Idle,
that takes about a second. A second signal stops at once.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time

from raysvc.serve.app import build_app
from raysvc.serve.args import ServeArgs

logger = logging.getLogger(__name__)

APP_NAME = "raysvc"


def start(args: ServeArgs, host: str = "127.0.0.1", port: int = 8000,
          address: str | None = None, num_cpus: int | None = None) -> str:
    """Start Ray (unless connecting), Serve and the app; return the base URL once ready."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level="warning")
        else:
            # Our own Ray: the serving processes are the main work here, so they run at
            # normal priority (Ray lowers workers to nice 15 by default).
            os.environ.setdefault("RAY_worker_niceness", "0")
            if num_cpus is None:  # enough logical CPUs that every CPU worker gets placed
                num_cpus = max(os.cpu_count() or 1,
                               math.ceil(args.max_workers * args.worker_num_cpus
                                         + args.draft_workers * args.draft_num_cpus))
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                     logging_level="warning")
    quiet = {"log_level": "WARNING", "enable_access_log": False}
    serve.start(http_options={"host": host, "port": port}, logging_config=quiet,
                proxy_location="HeadOnly" if not address else "EveryNode")
    serve.run(build_app(args.model_dump()), name=APP_NAME, route_prefix="/", blocking=False,
              logging_config=quiet)
    return f"http://{host}:{port}"


def drain(timeout_s: float) -> int:
    """Refuse new requests and wait (up to `timeout_s`) for those in flight; return how
    many were still running at the end."""
    import ray

    from raysvc.cluster.actors import NAMESPACE
    from raysvc.cluster.launch import AppNames

    routers = [e["name"] for e in ray.util.list_named_actors(all_namespaces=True)
               if e["namespace"] == NAMESPACE and e["name"].startswith(f"raysvc.{APP_NAME}.")
               and e["name"].endswith(":router")]
    if not routers:
        logger.warning("raysvc serve: no router of app %s to drain", APP_NAME)
        return 0
    router = AppNames("").get(routers[0])
    deadline, left = time.monotonic() + timeout_s, 0
    while True:
        try:
            left = ray.get(router.close.remote(), timeout=5)
        except Exception as e:  # no router to ask: nothing to wait for
            logger.warning("raysvc serve: drain: %r", e)
            return 0
        if left == 0 or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def stop(local: bool) -> None:
    import ray
    from ray import serve

    try:
        if local:
            pass  # ray.shutdown() below ends Serve, the app and every actor with it
        else:
            serve.delete(APP_NAME)
    finally:
        if local and ray.is_initialized():
            ray.shutdown()


def usage_text(url: str, args: ServeArgs) -> str:
    key = "$RAYSVC_API_KEY" if not args.api_key else "YOUR_API_KEY"  # the --api-key value
    auth = f' -H "Authorization: Bearer {key}"' if args.resolved_api_key() else ""
    py_key = ("os.environ.get('RAYSVC_API_KEY', 'none')" if not args.api_key
              else "'YOUR_API_KEY'")
    name = args.model_name()
    drafts = f" and {args.draft_workers} draft actor(s)" if args.draft_workers else ""
    workers = f"{args.num_workers} worker(s)"
    if args.min_workers != args.max_workers:
        workers += f", scaling between {args.min_workers} and {args.max_workers}"
    return (f"raysvc is serving {name!r} with {workers}{drafts} at {url}/v1\n"
            f"  curl {url}/v1/completions{auth} -H 'Content-Type: application/json' \\\n"
            f"       -d '{{\"model\": \"{name}\", \"prompt\": \"The list type\", "
            f"\"max_tokens\": 32}}'\n"
            f"  python -c \"import os; from openai import OpenAI; c = OpenAI(base_url='{url}/v1', "
            f"api_key={py_key}); print(c.completions.create("
            f"model='{name}', prompt='The list type').choices[0].text)\"\n"
            f"  stats: {url}/cluster/stats   health: {url}/health   stop: Ctrl-C")


def serve_forever(args: ServeArgs, host: str, port: int, address: str | None = None,
                  num_cpus: int | None = None, drain_timeout_s: float = 30.0) -> int:
    stopping = threading.Event()

    def on_signal(signum, _frame) -> None:
        if stopping.is_set():  # a second signal: do not wait for the drain
            print("raysvc serve: stopping now", flush=True)
            os._exit(130)
        logger.warning("raysvc serve: %s received, draining (up to %gs; again to stop now)",
                       signal.Signals(signum).name, drain_timeout_s)
        stopping.set()

    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.signal(s, on_signal) for s in signals}
    try:
        url = start(args, host, port, address, num_cpus)
        for s in signals:  # again: ray.init installs its own handler, which kills the process
            signal.signal(s, on_signal)
        print(usage_text(url, args), flush=True)
        while not stopping.wait(0.2):
            pass
        left = drain(drain_timeout_s)
        if left:
            print(f"raysvc serve: {left} request(s) still running after the {drain_timeout_s:g}s "
                  f"drain; stopping them", flush=True)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        stop(local=address is None)
    print("raysvc serve: stopped", flush=True)
    return 0

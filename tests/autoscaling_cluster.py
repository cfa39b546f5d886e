"""A Ray cluster whose nodes come and go with demand, on one machine, for tests.

Ray's own `ray.cluster_utils.AutoscalingCluster` cannot start in Ray 2.60: it reads
`autoscaler/_private/fake_multi_node/example.yaml`, which the 2.60 wheel does not ship
(FileNotFoundError in its constructor); it would also run `ray stop --force` (killing every
Ray on the machine) and take the fixed port 6379. This one writes the same fake
multi-node provider config itself and starts the head through `ray.cluster_utils.Cluster`
on a free port with no dashboard; Ray's monitor (autoscaler v1) then adds and removes
worker "nodes" (raylets on this machine) as actors need them and as they go idle.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class LocalAutoscalingCluster:
    def __init__(self, head_resources: dict[str, float],
                 worker_node_types: dict[str, dict[str, Any]],
                 idle_timeout_minutes: float = 0.1) -> None:
        import ray

        self.head_resources = dict(head_resources)
        self.port = _free_port()
        self.gcs_address = f"{ray.util.get_node_ip_address()}:{self.port}"
        types = dict(worker_node_types)
        types["ray.head.default"] = {"resources": self.head_resources, "node_config": {},
                                     "max_workers": 0}
        self.config = {
            "cluster_name": "raysvc-test", "max_workers": 8,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True,
                         "gcs_address": self.gcs_address},
            "available_node_types": types, "head_node_type": "ray.head.default",
            "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes,
            "docker": {}, "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [],
            "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
            "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [],
        }
        self.cluster = None

    def start(self) -> str:
        from ray.cluster_utils import Cluster

        fd, path = tempfile.mkstemp(suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(self.config, f)
        # read by the monitor (autoscaler) process the head starts
        env = {"AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            res = dict(self.head_resources)
            self.cluster = Cluster(initialize_head=True, head_node_args=dict(
                num_cpus=res.pop("CPU", 0), num_gpus=res.pop("GPU", 0), resources=res,
                include_dashboard=False, gcs_server_port=self.port,
                autoscaling_config=path))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return self.cluster.address

    def shutdown(self) -> None:
        """Stop the head, then the nodes the monitor started (its children, found by the
        session directory on their command lines)."""
        if self.cluster is None:
            return
        import signal

        session_dir = self.cluster.head_node.get_session_dir_path()
        self.cluster.shutdown()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if session_dir.encode() in f.read():
                        os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass

"""Offline checks of raysvc's KubeRay manifests, as KubeRay and Kubernetes would make them.

- `schema_problems`: a `ray.io/v1` document against its CRD's openAPIV3Schema (KubeRay
  v1.7.0, ../shared/kuberay/), the way the API server does: the schema's defaults first,
  then validation, with unknown keys refused (`kubectl --validate=strict`).
- `operator_problems`: what only the KubeRay operator checks (names, replica ranges,
  string rayStartParams, a resource set twice), and what raysvc's design needs (the app's
  worker range equal to the engine group's, GPU requests == limits == num-gpus, grace
  period >= drain timeout, the serve port, secrets never inline, the Ray version).
Each returns a list of human-readable problems: empty means valid.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "kuberay"
CRDS = {"RayService": "ray.io_rayservices.yaml", "RayJob": "ray.io_rayjobs.yaml",
        "RayCluster": "ray.io_rayclusters.yaml"}
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def crd_schema(kind: str) -> dict:
    crd = yaml.safe_load((SHARED / CRDS[kind]).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


def _strict(schema: Any) -> Any:
    """additionalProperties: false wherever properties are listed (unless the schema
    keeps unknown fields on purpose)."""
    if isinstance(schema, dict):
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for value in schema.values():
            _strict(value)
    elif isinstance(schema, list):
        for value in schema:
            _strict(value)
    return schema


def _defaults(schema: dict, doc: Any) -> None:
    """Fill the schema's defaults into `doc`, as the API server does before validating."""
    if isinstance(doc, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in doc and "default" in sub:
                doc[name] = copy.deepcopy(sub["default"])
            if name in doc:
                _defaults(sub, doc[name])
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for item in doc:
            _defaults(schema["items"], item)


def schema_problems(doc: dict) -> list[str]:
    from jsonschema import Draft4Validator

    schema = crd_schema(doc["kind"])
    doc = copy.deepcopy(doc)
    _defaults(schema, doc)
    return [f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, e.path))}: "
            f"{e.message}" for e in Draft4Validator(schema).iter_errors(doc)]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterConfig" if doc["kind"] == "RayService" else "rayClusterSpec"]


def _groups(cluster: dict) -> list[tuple[str, dict, dict]]:
    """(name, group, its first container) for the head and every worker group."""
    out = [("head", cluster["headGroupSpec"],
            cluster["headGroupSpec"]["template"]["spec"]["containers"][0])]
    for g in cluster.get("workerGroupSpecs", []):
        out.append((g["groupName"], g, g["template"]["spec"]["containers"][0]))
    return out


def serve_apps(doc: dict) -> list[dict]:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]


def operator_problems(doc: dict) -> list[str]:
    problems: list[str] = []
    name = doc["metadata"]["name"]
    if len(name) > 47 or not DNS_1035.match(name):
        problems.append(f"metadata.name {name!r}: must be DNS-1035 and at most 47 characters")
    cluster = _cluster_spec(doc)
    import ray

    if cluster.get("rayVersion") != ray.__version__:
        problems.append(f"rayVersion {cluster.get('rayVersion')} != installed Ray "
                        f"{ray.__version__}")
    for group_name, group, container in _groups(cluster):
        params = group.get("rayStartParams", {})
        for key, value in params.items():
            if not isinstance(value, str):
                problems.append(f"{group_name}.rayStartParams.{key}: must be a string")
        for key in group.get("resources", {}) or {}:
            if key in params or key.lower() in (params.get("resources") or ""):
                problems.append(f"{group_name}: {key} set both in rayStartParams and resources")
        if group_name != "head":
            lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 2 ** 31 - 1)
            if lo > hi:
                problems.append(f"{group_name}: minReplicas {lo} > maxReplicas {hi}")
            if not lo <= group.get("replicas", lo) <= hi:
                problems.append(f"{group_name}: replicas outside [minReplicas, maxReplicas]")
        res = container.get("resources", {})
        gpus = {k: str(v.get("nvidia.com/gpu")) for k, v in res.items() if "nvidia.com/gpu" in v}
        if gpus or "num-gpus" in params:
            wanted = params.get("num-gpus")
            if gpus.get("requests") != wanted or gpus.get("limits") != wanted:
                problems.append(f"{group_name}: nvidia.com/gpu requests {gpus.get('requests')} "
                                f"/ limits {gpus.get('limits')} != num-gpus {wanted}")
        for env in container.get("env", []):
            if re.search(r"TOKEN|KEY|SECRET|PASSWORD", env["name"]) and "value" in env:
                problems.append(f"{group_name}: env {env['name']} inline; use secretKeyRef")
    if doc["kind"] == "RayService":
        problems += _service_problems(doc, cluster)
    if doc["kind"] == "RayJob":
        problems += _job_problems(doc, cluster)
    return problems


def _service_problems(doc: dict, cluster: dict) -> list[str]:
    from ray.serve.schema import ServeDeploySchema

    from raysvc.cluster.autoscaler import AutoscalingConfig
    from raysvc.serve.args import ServeArgs

    problems = []
    ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    head = cluster["headGroupSpec"]
    ports = {p.get("name"): p["containerPort"]
             for p in head["template"]["spec"]["containers"][0].get("ports", [])}
    if ports.get("serve") != 8000:
        problems.append(f"head: the serve port must be named serve and be 8000, got {ports}")
    if head["rayStartParams"].get("num-cpus") != "0":
        problems.append('head: rayStartParams num-cpus must be "0" (nothing lands there)')
    if not cluster.get("enableInTreeAutoscaling"):
        problems.append("enableInTreeAutoscaling must be true (GPU pods follow the workers)")
    for app in serve_apps(doc):
        if app["import_path"] != "raysvc.serve.app:build_app":
            problems.append(f"app {app['name']}: import_path {app['import_path']}")
            continue
        args = ServeArgs(**app.get("args", {}))  # raises naming the field
        engines = [g for g in cluster["workerGroupSpecs"]]
        group = engines[0]
        if (args.min_workers, args.max_workers) != (group["minReplicas"], group["maxReplicas"]):
            problems.append(f"app workers [{args.min_workers}, {args.max_workers}] != group "
                            f"{group['groupName']} [{group['minReplicas']}, "
                            f"{group['maxReplicas']}]")
        if args.min_workers >= args.max_workers:
            problems.append("min_workers must be < max_workers: the pool should scale")
        gpus = group["rayStartParams"].get("num-gpus")
        if gpus and str(int(args.worker_num_gpus or 0)) != gpus:
            problems.append(f"worker_num_gpus {args.worker_num_gpus} != group num-gpus {gpus}")
        for key in args.control_resources:
            if key not in head["rayStartParams"].get("resources", ""):
                problems.append(f"control_resources {key}: not advertised by the head")
        if not args.control_resources:
            problems.append("control_resources: the control plane must be pinned to the head")
        drain = AutoscalingConfig.parse(args.worker_autoscaling).drain_timeout_s
        grace = group["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        if grace < drain:
            problems.append(f"terminationGracePeriodSeconds {grace} < drain_timeout_s {drain}")
    return problems


def _job_problems(doc: dict, cluster: dict) -> list[str]:
    spec, problems = doc["spec"], []
    if not spec.get("entrypoint", "").startswith("raysvc batch "):
        problems.append("entrypoint must run raysvc batch")
    if not spec.get("shutdownAfterJobFinishes") or spec.get("ttlSecondsAfterFinished") is None:
        problems.append("shutdownAfterJobFinishes and ttlSecondsAfterFinished must be set")
    if spec.get("backoffLimit", 0) < 1:
        problems.append("backoffLimit >= 1: a retry resumes the batch")
    if not cluster.get("enableInTreeAutoscaling"):
        problems.append("enableInTreeAutoscaling must be true")
    return problems


def metric_names_in_code() -> set[str]:
    """Names raysvc records (`_make("Kind", "raysvc_x", ...)`), as Ray exports them."""
    text = (ROOT / "raysvc" / "cluster" / "metrics.py").read_text()
    names = set()
    for kind, name in re.findall(r'_make\(\s*"(\w+)",\s*"(raysvc_\w+)"', text):
        base = f"ray_{name}"
        names |= ({f"{base}_total"} if kind == "Counter" else
                  {f"{base}_bucket", f"{base}_sum", f"{base}_count"} if kind == "Histogram"
                  else {base})
    return names


def dashboard_metrics(path: Path) -> set[str]:
    dash = json.loads(path.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v.get("query", "") for v in dash.get("templating", {}).get("list", [])
              if isinstance(v.get("query"), str)]
    return {m for e in exprs for m in re.findall(r"\bray_raysvc_\w+", e)}

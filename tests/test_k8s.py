"""[k8s] The KubeRay manifests, checked offline against KubeRay's own CRD schemas and the
operator's rules (tests/k8s_check.py), rendered by kustomize as `kubectl apply -k` would;
and the files that must agree with them (the Serve config, the Dockerfile, e2e.sh, the
Grafana dashboard, the code's metric names)."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess

import pytest
import yaml
from k8s_check import (
    ROOT,
    SHARED,
    dashboard_metrics,
    metric_names_in_code,
    operator_problems,
    schema_problems,
    serve_apps,
)

K8S = ROOT / "k8s"
KUSTOMIZATIONS = ["serve", "batch", "monitoring", "overlays/cpu/serve", "overlays/cpu/batch"]

needs_crds = pytest.mark.skipif(not SHARED.exists(), reason=f"KubeRay CRD schemas not found "
                                f"at {SHARED} (they ship beside the project, not with it)")
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None,
                                   reason="kubectl not installed: kustomize overlays not rendered")


def render(path: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(K8S / path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def docs() -> dict[str, list[dict]]:
    if shutil.which("kubectl"):
        return {k: render(k) for k in KUSTOMIZATIONS}
    return {k: [d for f in sorted((K8S / k).glob("*.yaml")) if f.name != "kustomization.yaml"
                for d in yaml.safe_load_all(f.read_text()) if d]
            for k in ("serve", "batch")}  # overlays need kustomize


def ray_docs(docs) -> list[dict]:
    return [d for group in docs.values() for d in group if d["apiVersion"] == "ray.io/v1"]


@needs_kubectl
def test_every_kustomization_renders(docs):
    kinds = {k: sorted(d["kind"] for d in v) for k, v in docs.items()}
    assert kinds["serve"] == ["NetworkPolicy", "PersistentVolumeClaim", "RayService"]
    assert kinds["overlays/cpu/serve"] == ["NetworkPolicy", "RayService"]  # no model volume
    assert kinds["batch"] == ["NetworkPolicy", "PersistentVolumeClaim", "RayJob"]
    assert kinds["monitoring"] == ["ConfigMap", "PodMonitor"]


@needs_crds
def test_ray_documents_validate_against_kuberays_crds(docs):
    found = ray_docs(docs)
    assert len(found) >= 2
    for doc in found:
        assert schema_problems(doc) == []


@needs_crds
def test_operator_rules_and_raysvc_invariants_hold(docs):
    for doc in ray_docs(docs):
        assert operator_problems(doc) == [], doc["metadata"]["name"]


@needs_crds
@pytest.mark.parametrize("break_it, expect", [
    (lambda d: d["spec"].__setitem__("upgradeStrategi", {"type": "NewCluster"}),
     "upgradeStrategi"),
    (lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
     ["containers"][0].__setitem__("imagePullPolcy", "Always"), "imagePullPolcy"),
])
def test_a_misspelt_key_is_refused(docs, break_it, expect):
    doc = copy.deepcopy(_service(docs))
    break_it(doc)
    problems = schema_problems(doc)
    assert problems and expect in " ".join(problems), problems


@needs_crds
def test_a_min_above_max_replica_range_is_refused(docs):
    doc = copy.deepcopy(_service(docs))
    group = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    group["minReplicas"], group["maxReplicas"] = 5, 2
    assert any("minReplicas 5 > maxReplicas 2" in p for p in operator_problems(doc))


@pytest.mark.parametrize("args, field", [
    ({"min_workers": 3, "max_workers": 2}, "min_workers"),
    ({"worker_num_gpus": -1}, "worker_num_gpus"),
    ({"engine": {"max_num_seqs": 0}}, "max_num_seqs"),
    ({"num_wrokers": 2}, "num_wrokers"),
])
def test_a_serve_config_that_serveargs_refuses_is_refused(docs, args, field):
    doc = copy.deepcopy(_service(docs))
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    config["applications"][0]["args"].update(args)
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    from raysvc.serve.app import build_app

    with pytest.raises(ValueError, match=field):
        operator_problems(doc)
    with pytest.raises(ValueError, match=field):  # and what Serve would run refuses them
        build_app(config["applications"][0]["args"])


def _service(docs) -> dict:
    return next(d for d in ray_docs(docs) if d["kind"] == "RayService")


@needs_kubectl
def test_cpu_overlay_serves_the_deploy_config(docs):
    """deploy/serve_config.yaml is the one source of the app's arguments: the CPU overlay
    (the same app on kind) differs only in its worker range and control-plane pinning."""
    deploy = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    (app,) = serve_apps(next(d for d in docs["overlays/cpu/serve"] if d["kind"] == "RayService"))
    (local,) = deploy["applications"]
    assert (app["import_path"], app["route_prefix"], app["name"]) == (
        local["import_path"], local["route_prefix"], local["name"])
    cluster_only = {"min_workers", "max_workers", "control_resources"}
    assert {k: v for k, v in app["args"].items() if k not in cluster_only} == {
        k: v for k, v in local["args"].items() if k not in cluster_only}
    # the GPU service sets every argument the Serve config sets (and says its values)
    (gpu_app,) = serve_apps(next(d for d in docs["serve"] if d["kind"] == "RayService"))
    assert set(local["args"]) <= set(gpu_app["args"])


def test_image_ray_version_ports_and_tags_agree_everywhere():
    import ray

    import raysvc  # noqa: F401

    dockerfile = (K8S / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={ray.__version__}" in dockerfile
    assert "FROM rayproject/ray:${RAY_VERSION}-py311-${VARIANT}" in dockerfile
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"ray[serve,data]=={ray.__version__}"' in pyproject
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    tags = {f"raysvc:{version}-gpu", f"raysvc:{version}-cpu"}
    images = set()
    for f in K8S.rglob("*.yaml"):
        images |= set(re.findall(r"image: (raysvc:\S+)", f.read_text()))
    images |= set(re.findall(r"value: (raysvc:\S+)", "".join(
        f.read_text() for f in K8S.rglob("*.yaml"))))
    assert images == tags, images
    for tag in tags:  # the build commands build exactly these
        assert f"-t {tag} ." in dockerfile
    e2e = (K8S / "e2e.sh").read_text()
    assert f"IMAGE=raysvc:{version}-cpu" in e2e
    assert "EXPOSE 8000" in dockerfile and "$PORT:8000" in e2e
    assert "svc/raysvc-serve-svc" in e2e  # KubeRay names the serve service <name>-serve-svc
    assert "kubectl apply -k k8s/overlays/cpu/serve" in e2e
    assert "kubectl apply -k k8s/overlays/cpu/batch" in e2e


def test_dashboard_names_only_metrics_raysvc_exports():
    exported = metric_names_in_code()
    used = dashboard_metrics(K8S / "monitoring" / "grafana-dashboard.json")
    assert used and used <= exported, sorted(used - exported)
    for wanted in ("ray_raysvc_num_requests_running", "ray_raysvc_kv_cache_usage_perc",
                   "ray_raysvc_time_to_first_token_seconds_bucket",
                   "ray_raysvc_inter_token_latency_seconds_bucket",
                   "ray_raysvc_prefix_cache_hits_total",
                   "ray_raysvc_spec_decode_num_accepted_tokens_total",
                   "ray_raysvc_workers_draining"):
        assert wanted in used, wanted


def _pod_templates(doc: dict) -> list[dict]:
    spec = doc["spec"]["rayClusterConfig" if doc["kind"] == "RayService" else "rayClusterSpec"]
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in
                                                  spec.get("workerGroupSpecs", [])]


@needs_kubectl
def test_pods_run_locked_down_and_auth_fails_closed(docs):
    """Every raysvc pod: non-root, no privilege escalation, no capabilities, read-only model
    mounts, the NetworkPolicy's label; the API key's Secret is required (a RayService with
    no Secret does not start, rather than serving 0.0.0.0 without auth)."""
    for name in ("serve", "batch", "overlays/cpu/serve", "overlays/cpu/batch"):
        for doc in ray_docs({name: docs[name]}):
            for template in _pod_templates(doc):
                assert template["metadata"]["labels"]["app.kubernetes.io/part-of"] == "raysvc"
                pod = template["spec"]
                assert pod["securityContext"]["runAsNonRoot"] is True, (name, pod)
                for c in pod["containers"]:
                    sc = c["securityContext"]
                    assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
                    assert sc["capabilities"]["drop"] == ["ALL"], (name, c["name"])
                    for m in c.get("volumeMounts", []):  # the models are only read
                        assert m["name"] != "models" or m.get("readOnly"), (name, m)
                    for env in c.get("env", []):
                        ref = env.get("valueFrom", {}).get("secretKeyRef")
                        if env["name"] == "RAYSVC_API_KEY":
                            assert ref and not ref.get("optional", False), (name, env)
        (policy,) = [d for d in docs[name] if d["kind"] == "NetworkPolicy"]
        selector = policy["spec"]["podSelector"]["matchLabels"]
        assert selector == {"app.kubernetes.io/part-of": "raysvc"}
        open_rules = [r for r in policy["spec"]["ingress"] if "from" not in r]
        open_ports = {p["port"] for r in open_rules for p in r["ports"]}
        assert open_ports == {8000, 8080}  # never 8265 (dashboard), 6379 (GCS), 10001
        for rule in policy["spec"]["ingress"]:
            if "from" in rule:
                assert all("podSelector" in f for f in rule["from"]), rule  # no ipBlock

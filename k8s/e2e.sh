#!/usr/bin/env bash
# End to end on a real Kubernetes cluster (kind): KubeRay, the CPU image, the RayService,
# both OpenAI endpoints, the RayJob on a small batch file, then tear down.
#
#   k8s/e2e.sh            # needs docker, kind, kubectl, helm; run from anywhere
#
# Every step is a command you can also run by hand, in this order. KEEP=1 leaves the
# cluster up at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${CLUSTER:-raysvc-e2e}
KUBERAY_VERSION=${KUBERAY_VERSION:-1.7.0}
IMAGE=raysvc:0.1.0-cpu
PORT=${PORT:-8000}

step() { printf '\n== %s\n' "$*"; }

step "kind cluster $CLUSTER"
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s

step "KubeRay operator $KUBERAY_VERSION"
helm repo add kuberay https://ray-project.github.io/kuberay-helm/ >/dev/null
helm repo update >/dev/null
helm upgrade --install kuberay-operator kuberay/kuberay-operator --version "$KUBERAY_VERSION" --wait

step "image $IMAGE (CPU variant: the built-in model is inside, nothing to download)"
docker build -f k8s/Dockerfile --build-arg VARIANT=cpu -t "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"

step "API key Secret (required: without it the RayService's pods do not start)"
API_KEY=${API_KEY:-$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')}
kubectl create secret generic raysvc-api-key --from-literal=api-key="$API_KEY" \
  --dry-run=client -o yaml | kubectl apply -f -
AUTH="Authorization: Bearer $API_KEY"

step "RayService (k8s/overlays/cpu/serve)"
kubectl apply -k k8s/overlays/cpu/serve
kubectl wait --for=condition=Ready rayservice/raysvc --timeout=900s

step "OpenAI endpoints through the serve service"
kubectl port-forward svc/raysvc-serve-svc "$PORT:8000" >/tmp/raysvc-port-forward.log 2>&1 &
PF=$!
trap 'kill $PF 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -sf "localhost:$PORT/health" >/dev/null && break; sleep 2; done
curl -sf "localhost:$PORT/v1/completions" -H "$AUTH" -H 'Content-Type: application/json' \
  -d '{"model": "tiny", "prompt": "The list type", "max_tokens": 16, "temperature": 0}' \
  | python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["choices"][0]["text"], r; print("completions:", repr(r["choices"][0]["text"]))'
curl -sf "localhost:$PORT/v1/chat/completions" -H "$AUTH" -H 'Content-Type: application/json' \
  -d '{"model": "tiny", "messages": [{"role": "user", "content": "What is a list?"}], "max_tokens": 16}' \
  | python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["choices"][0]["message"]["content"], r; print("chat:", repr(r["choices"][0]["message"]["content"]))'
curl -sf -H "$AUTH" "localhost:$PORT/metrics" | grep -q ray_raysvc_ && echo "metrics: ok"
curl -sf -H "$AUTH" "localhost:$PORT/cluster/stats" | python3 -c 'import json,sys; s=json.load(sys.stdin); print("workers:", s["ready_workers"], "of", s["min_workers"], "..", s["max_workers"])'

step "RayJob on a small batch file (k8s/overlays/cpu/batch)"
python3 - >/tmp/raysvc-batch-input.jsonl <<'EOF'
import json
for i in range(8):
    print(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                      "body": {"model": "tiny", "prompt": f"The list type {i}", "max_tokens": 8,
                               "temperature": 0}}))
EOF
kubectl create configmap raysvc-batch-input --from-file=input.jsonl=/tmp/raysvc-batch-input.jsonl \
  --dry-run=client -o yaml | kubectl apply -f -
kubectl delete rayjob raysvc-batch --ignore-not-found
kubectl apply -k k8s/overlays/cpu/batch
kubectl wait --for=jsonpath='{.status.jobStatus}'=SUCCEEDED rayjob/raysvc-batch --timeout=1200s

step "the job's output (read from its volume)"
kubectl run raysvc-batch-reader --rm -i --restart=Never --image=busybox --overrides='
{"spec": {"volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "raysvc-batch-data"}}],
  "containers": [{"name": "r", "image": "busybox", "command": ["sh", "-c", "cat /data/output.jsonl"],
                  "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]}}' \
  >/tmp/raysvc-batch-output.jsonl
python3 -c '
import json
rows = [json.loads(x) for x in open("/tmp/raysvc-batch-output.jsonl") if x.startswith("{")]
assert sorted(r["custom_id"] for r in rows) == [f"r{i}" for i in range(8)], rows
assert all(r["response"]["status_code"] == 200 for r in rows)
print("batch: 8 rows, one line each, all 200")'

if [ "${KEEP:-0}" != 1 ]; then
  step "tear down"
  kind delete cluster --name "$CLUSTER"
fi
echo "e2e: ok"

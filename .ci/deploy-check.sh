#!/usr/bin/env bash
# Static checks of the deployment kit (deploy/): each runs when its tool is there and says
# SKIPPED otherwise. The metric names the dashboard and alert rules use are checked against a
# running gateway by `cargo test --test ops` (part of the test run), not here.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
skipped() { echo "SKIPPED: $*"; }

# Compose: the file parses, anchors and variables resolve (no Docker engine needed).
if docker compose version >/dev/null 2>&1; then
    docker compose -f deploy/compose.yaml config --quiet && echo "compose.yaml: ok (docker compose)"
elif command -v docker-compose >/dev/null 2>&1; then
    docker-compose -f deploy/compose.yaml config --quiet && echo "compose.yaml: ok (docker-compose)"
else
    skipped "compose.yaml (no docker compose)"
fi

# nginx: `nginx -t` on copies whose host-specific parts point into a scratch folder: the
# compose file's service names become 127.0.0.1 (nginx resolves upstream names at start), the
# example's certificate paths a throwaway self-signed pair, the log paths the scratch folder.
if command -v nginx >/dev/null 2>&1; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
        -subj /CN=nginx-test -keyout "$work/privkey.pem" -out "$work/fullchain.pem" 2>/dev/null
    for conf in deploy/nginx.conf deploy/compose/nginx.conf; do
        sed -e "s|gateway[12]:8080|127.0.0.1:8080|" \
            -e "s|/etc/nginx/tls/|$work/|" \
            -e "s|/var/log/nginx/access.log|$work/access.log|" \
            "$conf" >"$work/nginx.conf"
        nginx -t -q -p "$work" -c "$work/nginx.conf" -g "pid $work/nginx.pid; error_log $work/error.log;"
        echo "$conf: ok (nginx -t)"
    done
else
    skipped "nginx configs (no nginx)"
fi

# Grafana dashboard: valid JSON with panels; its queries, with Grafana's variables given
# values, become recording rules so that promtool checks their PromQL too.
python3 - deploy/grafana/matchgate.json "$work/dashboard-rules.yaml" <<'PY'
import json, sys
dashboard = json.load(open(sys.argv[1]))
exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
assert exprs, "no queries"
with open(sys.argv[2], "w") as out:
    out.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, e in enumerate(exprs):
        for var, value in (("$__rate_interval", "5m"), ("$__range", "1h"), ("$instance", ".*"), ("$job", ".*")):
            e = e.replace(var, value)
        out.write(f"      - record: dashboard:query{i}\n        expr: {json.dumps(e)}\n")
print(f"grafana/matchgate.json: ok (JSON, {len(exprs)} queries)")
PY

# Prometheus alert rules, and the dashboard's queries.
if command -v promtool >/dev/null 2>&1; then
    promtool check rules deploy/prometheus/alerts.yaml "$work/dashboard-rules.yaml"
else
    skipped "alert rules and dashboard PromQL (no promtool)"
fi

# Helm chart: lint, render, and check the rendered manifests against the Kubernetes schemas.
if command -v helm >/dev/null 2>&1; then
    helm lint deploy/helm/matchgate
    helm lint deploy/helm/matchgate --set serviceMonitor.enabled=true --set tls.secretName=tls
    helm template matchgate deploy/helm/matchgate --set serviceMonitor.enabled=true \
        --set tls.secretName=tls >"$work/rendered.yaml"
    if command -v kubeconform >/dev/null 2>&1; then
        # ServiceMonitor is a CRD (prometheus-operator): no built-in schema.
        kubeconform -strict -summary -skip ServiceMonitor "$work/rendered.yaml"
    else
        skipped "schema check of the rendered chart (no kubeconform)"
    fi
else
    skipped "helm lint and template (no helm)"
fi

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

# Helm chart: lint and render each value set of the chart's ci/ folder (with `helm` when it
# is installed, otherwise through Helm's Go SDK as packaged by helm-python-sdk), then check
# every rendered manifest against the Kubernetes API schemas (kubernetes-validate, strict:
# unknown fields fail) of the oldest version the chart supports and of a current one. The
# ServiceMonitor is a CRD without a bundled schema: it is rendered and parsed, not validated.
chart=deploy/helm/matchgate
venv="$work/venv"
if python3 -m venv "$venv" >/dev/null 2>&1 \
    && "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.37.0 \
    && { command -v helm >/dev/null 2>&1 \
        || "$venv/bin/pip" install --quiet --disable-pip-version-check helm-python-sdk==0.2.2; }; then
    mkdir -p "$work/rendered"
    if command -v helm >/dev/null 2>&1; then
        for values in "$chart"/ci/*-values.yaml; do
            helm lint --strict "$chart" -f "$values"
            helm template matchgate "$chart" --namespace matchgate -f "$values" \
                >"$work/rendered/$(basename "$values" .yaml).yaml"
        done
    else
        "$venv/bin/python" .ci/helm-check.py "$chart" "$work/rendered"
    fi
    for version in 1.30.0 1.37.0; do
        "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" "$work"/rendered/*.yaml
        echo "rendered chart: ok (Kubernetes $version schemas)"
    done
else
    skipped "helm chart (cannot install kubernetes-validate or helm-python-sdk)"
fi

"""Lints and renders the Helm chart without a `helm` binary, through Helm's own Go SDK as
packaged by helm-python-sdk (libhelm_c), for each value set in the chart's ci/ folder.

usage: helm-check.py CHART OUT_DIR  (writes OUT_DIR/<values name>.yaml)
"""
import json
import pathlib
import sys

from helm_python import values_from_yaml
from helm_python.chart import Chart, lint

chart_dir = pathlib.Path(sys.argv[1])
out_dir = pathlib.Path(sys.argv[2])
chart = Chart.load(chart_dir)
failed = False
for values_file in sorted((chart_dir / "ci").glob("*-values.yaml")):
    values = values_from_yaml(values_file.read_text())
    report = lint(str(chart_dir), values, strict=True, kube_version="v1.30.0")
    # Severity 1 is information ("icon is recommended"); warnings and errors fail.
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    print(f"helm lint ({values_file.name}): {'ok' if not problems else json.dumps(problems)}")
    failed |= bool(problems)
    manifests = chart.render(values, name="matchgate", namespace="matchgate")
    with open(out_dir / f"{values_file.stem}.yaml", "w") as out:
        for source, manifest in sorted(manifests.items()):
            if manifest.strip():
                out.write(f"---\n# Source: {source}\n{manifest}\n")
sys.exit(1 if failed else 0)

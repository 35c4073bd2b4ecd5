#!/usr/bin/env bash
# Validate the monitoring config: Prometheus config, alert and recording rules (promtool), their unit tests,
# and the Grafana dashboard JSON. Run from anywhere: bash deploy/check.sh
# promtool comes with Debian's prometheus package: apt-get install -y --no-install-recommends prometheus
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null 2>&1; then
  echo "check.sh: promtool not found; install it with: apt-get install -y --no-install-recommends prometheus" >&2
  exit 2
fi
PYTHON=${PYTHON:-python3}

promtool check config deploy/prometheus.yml   # also checks rule_files (resolved next to the config)
promtool check config deploy/prometheus.fleet.yml
promtool check rules deploy/alerts.yml deploy/recording_rules.yml
promtool test rules deploy/alerts_test.yml
for f in deploy/grafana/dashboards/*.json; do
  "$PYTHON" -m json.tool "$f" >/dev/null
  echo "  SUCCESS: $f is valid JSON"
done
echo "deploy/check.sh: all checks passed"

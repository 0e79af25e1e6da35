#!/usr/bin/env bash
# `make demo`: start a local Ray head on loopback, submit the DCL mini run with `ray job submit`,
# print the metrics table and the report path, stop Ray. Every wait is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
CONFIG=${CONFIG:-workloads/configs/dcl_mini.yaml}
OUT=${OUT:-runs/dcl-mini}
# The benchmark's five methods plus mrlora_proto and mrlora_knn, so the report puts the MLLM router and two
# training-free ones (prototype: class means; knn: nearest neighbour) side by side.
# METHODS= (empty) runs the config's own methods list (`make table`).
METHODS=${METHODS-mrlora,mrlora_proto,mrlora_knn,lora_ft,lora_ft_replay,oracle,zero_shot}
EXTRA=${EXTRA:-}   # extra key=value overrides of the run config
# The job's script and arguments (`make study` submits workloads/run_study.py instead); REPORT=0 skips the metrics
# table of a run at the end.
if [ -z "${DEMO_JOB:-}" ]; then
  DEMO_JOB="workloads/run_stream.py --config '$CONFIG' --out '$OUT'"
  [ -z "$METHODS" ] || DEMO_JOB="$DEMO_JOB --methods '$METHODS'"
  DEMO_JOB="$DEMO_JOB $EXTRA"
fi
REPORT=${REPORT:-1}
# PRINT_JOB=1: print the command the job would run and stop (nothing is built or started).
if [ -n "${PRINT_JOB:-}" ]; then bash -c "printf '%s\\n' $DEMO_JOB"; exit 0; fi
# Ports: the Ray client server must sit outside the worker port range (10002-19999 by default).
PORT=${RAY_PORT:-6381}
DASH=${RAY_DASHBOARD_PORT:-8266}
TMP=${RAY_TMP:-/tmp/clsvc-demo-ray}
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token TOKENIZERS_PARALLELISM=false
# Nothing preempts this one-machine cluster: Ray Train's preemption watcher would start one more actor
# process per stage (the workers read the variable through `ray start`'s environment).
export RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=${RAY_TRAIN_ENABLE_PREEMPTION_WATCHER:-0}
# The base store and other caches stay in the checkout (the Ray head started below passes this on to the job).
export CLSVC_HOME=${CLSVC_HOME:-$ROOT/.clsvc}
PY=$ROOT/.venv/bin/python
RAY=$ROOT/.venv/bin/ray

# The base model is built once (outside the job, so its progress bar shows here) and reused.
[ -n "${SKIP_BASE:-}" ] || $ROOT/.venv/bin/clsvc base build --profile tiny

# Stop only this cluster's processes (`ray stop` would stop every Ray instance of the machine).
cleanup() { timeout 60 "$PY" -m cl_service.on_ray.local stop --temp-dir "$TMP" --address "127.0.0.1:$PORT" >/dev/null 2>&1 || true; }
trap cleanup EXIT
# `ray start` needs an auth token and does not create one: make it on a machine that never ran Ray.
timeout 60 "$PY" -m cl_service.on_ray.local token
timeout 120 "$RAY" start --head --node-ip-address=127.0.0.1 --port="$PORT" --dashboard-host=127.0.0.1 \
  --dashboard-port="$DASH" --ray-client-server-port="${RAY_CLIENT_PORT:-23011}" --temp-dir="$TMP" \
  --disable-usage-stats >/dev/null
echo "Ray head on 127.0.0.1:$PORT, dashboard http://127.0.0.1:$DASH"
# Right after `ray start` the head's job agent may not be up yet ("No available agent to submit job"): submit
# without waiting, retrying for up to a minute, then follow the job's log and fail when the job did not succeed.
ID=clsvc-demo-$(date +%s)
for i in $(seq 1 30); do
  timeout 60 "$RAY" job submit --address "http://127.0.0.1:$DASH" --submission-id "$ID" --no-wait -- \
    bash -c "cd '$ROOT' && '$PY' $DEMO_JOB" \
    >/dev/null 2>"$TMP.submit.err" && break
  grep -q "already exists" "$TMP.submit.err" && break  # an earlier try got through after all
  [ "$i" -lt 30 ] || { cat "$TMP.submit.err"; exit 1; }
  sleep 2
done
timeout ${DEMO_TIMEOUT:-3600} "$RAY" job logs --address "http://127.0.0.1:$DASH" --follow "$ID"
STATUS=$(timeout 60 "$RAY" job status --address "http://127.0.0.1:$DASH" "$ID" 2>&1 | tail -3)
echo "$STATUS" | grep -qi succeeded || { echo "the run did not succeed: $STATUS"; exit 1; }
echo
[ "$REPORT" = 0 ] || "$PY" -m cl_service.cli report "$OUT"

#!/usr/bin/env bash
# Build .whl/ (git-ignored via .git/info/exclude), the wheels bench/device.sh installs on a GPU machine that
# has torch but no Ray or DeepSpeed and no network: Ray 2.60 slimmed to what the benches use (jars, rllib, llm
# and *.js.map removed; RECORD rewritten), its small dependencies, DeepSpeed 0.19.8 without ops. About 61 MB
# (grpcio + tools: the Serve benchmark generates the cl.v1 stubs there). Then copy the checkout with .whl/ to
# the GPU machine and run there, from its root: bash bench/device.sh train   (or serve, serve_ray, real, ...)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
B=$(mktemp -d); mkdir -p .whl
P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
   --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
python3 -m pip download $P -d "$B" ray==2.60.0
for p in pydantic==2.14.3 pydantic-core==2.50.4 typing-inspection annotated-types fastapi starlette uvicorn httptools \
         python-dotenv watchfiles websockets jsonschema jsonschema-specifications referencing rpds-py opencensus \
         opencensus-context opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions \
         opentelemetry-exporter-prometheus googleapis-common-protos aiohttp-cors colorful mmh3 smart-open tensorboardx \
         grpcio==1.85.1 grpcio-tools==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 tzdata msgpack click hjson py-cpuinfo ninja nvidia-ml-py einops prometheus-client; do
  python3 -m pip download $P -d .whl "$p"
done
DS_BUILD_OPS=0 python3 -m pip wheel --no-deps -w .whl deepspeed==0.19.8
mkdir "$B/ray" && (cd "$B/ray" && unzip -q ../ray-2.60.0-*.whl && rm -rf ray/jars ray/rllib ray/llm \
  && find . -name '*.js.map' -delete && python3 - <<'PY'
import csv, glob, os
rec = glob.glob("*.dist-info/RECORD")[0]
rows = [r for r in csv.reader(open(rec)) if r and (os.path.exists(r[0]) or r[0] == rec)]
csv.writer(open(rec, "w", newline="")).writerows(rows)
PY
) && (cd "$B/ray" && zip -q -9 -r "$OLDPWD/.whl/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl" .)
rm -rf "$B"; du -sh .whl

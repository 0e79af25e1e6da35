#!/usr/bin/env bash
# On a GPU machine without network, from the checkout's root: install the wheels of bench/wheels.sh (.whl: slimmed
# Ray 2.60 + deps, DeepSpeed 0.19.8) once, check the GPU fast paths against the plain ones (tests/gpu), then run one
# benchmark suite; results under $OUT (default bench/results/local). Test logs keep pytest's summary line of every
# test (-rfEsxXp) and the whole output, so a log says which test passed, failed or was skipped.
#   bash bench/device.sh train    # H100: matmul rate + every single-GPU training variant (~5 min)
#   bash bench/device.sh serve    # H100: two-stage serving (~4 min)
#   bash bench/device.sh x2       # 2 GPUs: 1 GPU vs DDP vs two experts at once
#   bash bench/device.sh serve_ray  # H100: two-stage serving through Ray Serve's gRPC proxy (~7 min)
#   bash bench/device.sh real       # clsvc run + clsvc serve on a 7B-shaped llava-hf base (bench/real_run.py)
#   bash bench/device.sh gpu_tests  # tests/gpu + bench.train's ray/inproc anchor
#   bash bench/device.sh tests      # tests/gpu alone
#   bash bench/device.sh scale      # knn vs MLLM router, 64 experts vs 9, adapter paging (~6 min)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 DS_BUILD_OPS=0 \
  TORCH_EXTENSIONS_DIR=/tmp/torch-ext
OUT=${OUT:-bench/results/local}; mkdir -p "$OUT"
if [ -d .whl ]; then  # once per machine: several suites may run in one call
  [ -f /tmp/site/.clsvc-installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl && touch /tmp/site/.clsvc-installed; } || echo "WHEEL INSTALL FAILED"
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
for m in ("transformers", "peft", "ray", "deepspeed", "aiohttp", "packaging", "protobuf", "pydantic"):
    try:
        mod = importlib.import_module(m if m != "protobuf" else "google.protobuf")
        print(m, getattr(mod, "__version__", "?"))
    except Exception as e:  # report, do not stop: the suite says what it could not run
        print(m, "MISSING", type(e).__name__, str(e)[:200])
PY
case "${1:-train}" in
  train)
    timeout 120 python3 -m pytest -q -rfEsxXp -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu_tests.txt"
    timeout 440 python3 -m bench.train --suite h100 --timeout 140 --out "$OUT/train_h100.json" ${TRAIN_ARGS:-} ;;
  serve)
    timeout 100 python3 -m pytest -q -rfEsxXp -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu_tests.txt"
    timeout 480 python3 -m bench.serve --out "$OUT/serve.json" ${SERVE_ARGS:-} ;;
  serve_ray)
    timeout ${SERVE_RAY_TIMEOUT:-560} python3 -m bench.serve_ray --out "$OUT/serve_ray.json" ${SERVE_ARGS:-} ;;
  real)  # the product path on one GPU: clsvc run + clsvc serve at LLaVA-1.5-7B shape (~8 min)
    timeout ${REAL_TIMEOUT:-570} python3 -m bench.real_run --out "$OUT/real_run.json" --run-timeout 420 ${REAL_ARGS:-} ;;
  gpu_tests)  # tests/gpu (the fast paths and the 2-task stream on the GPU) + the training anchor
    timeout 300 python3 -m pytest -q -rfEsxXp -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu_tests.txt"
    timeout 250 python3 -m bench.train --suite h100 --only ray,inproc --timeout 110 --out "$OUT/train_anchor.json" ;;
  tests)  # tests/gpu only: the fast paths, CUDA-graph decoding, ZeRO, the 2-task stream on the GPU
    timeout ${TESTS_TIMEOUT:-400} python3 -m pytest -q -rfEsxXp -p no:cacheprovider --durations=12 tests/gpu 2>&1 | tee "$OUT/gpu_tests.txt" ;;
  scale)  # the knn router vs the MLLM router, 64 experts vs 9, paging through host memory (bench/serve_scale.py)
    timeout ${SCALE_TIMEOUT:-560} python3 -m bench.serve_scale --out "$OUT/serve_scale.json" ${SCALE_ARGS:-} ;;
  x2)
    timeout 560 python3 -m bench.train --suite x2 --timeout 240 --out "$OUT/train_x2.json" ;;
  *) echo "unknown suite $1"; exit 2 ;;
esac

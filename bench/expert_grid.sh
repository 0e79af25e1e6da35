#!/usr/bin/env bash
# Expert recipes on the GPU against the carried CPU-built base (.clsvc/models/tiny): one line per
# (task, epochs, batch, seed) in $OUT/expert_grid.jsonl. See bench/expert_probe.py.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
OUT=${OUT:-bench/results/local}; mkdir -p "$OUT"
for task in RS Med AD Sci Fin; do
  for recipe in ${RECIPES:-5:16:0 5:16:1 5:8:0 5:8:1 8:16:0 10:16:0 3:8:0}; do
    IFS=: read -r ep bs sd <<<"$recipe"
    python3 -m bench.expert_probe --benchmark ${BENCH:-dcl-mini} --task $task --epochs $ep --batch $bs --seed $sd \
      --device cuda --tag grid --out "$OUT/expert_grid.jsonl" 2>&1 | grep '^{' | cut -c1-200
  done
done

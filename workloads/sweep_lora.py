"""Ray Tune sweep of a CL run over dotted config keys (expert LoRA rank/alpha/lr, router data, router kind).

    ray job submit --address http://127.0.0.1:8265 -- python workloads/sweep_lora.py \
        --config workloads/configs/sweep_dcl_mini.yaml --space workloads/configs/space_rank_router.yaml \
        [--out runs/sweep-rank-router] [key=value ...]

Each trial runs the stream with Ray Train workers inside; ASHA stops weak trials after a stage; trials that
share an expert config reuse one set of trained experts. Rerun with the same ``--out`` to finish only the
missing trials. Leaves sweep.csv, sweep.json, report.md and plots in ``--out``.
"""

import sys

from cl_service.on_ray.tune import main

if __name__ == "__main__":
    sys.exit(main())

"""Run a whole DCL/ACL stream (MR-LoRA and baselines) with training on Ray Train.

    ray job submit --address http://127.0.0.1:8265 -- python workloads/run_stream.py \
        --config workloads/configs/dcl_mini.yaml [--data DIR] [--methods mrlora,oracle] [--out DIR] [key=value ...]

Leaves metrics.json, report.md, heatmaps, adapters and predictions in the config's ``out`` folder;
rerunning with the same ``--out`` resumes (finished stages are verified by checksum and skipped).
"""

import sys

from cl_service.on_ray.stream import main

if __name__ == "__main__":
    sys.exit(main())

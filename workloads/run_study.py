"""A study of a CL config over several task orders and seeds, its cells run on Ray at once where resources allow.

    ray job submit --address http://127.0.0.1:8265 -- python workloads/run_study.py \
        --config workloads/configs/study_dcl_mini.yaml [--data DIR] [--methods mrlora,oracle] \
        [--orders K|ORDERS_FILE] [--seeds N|S1,S2,...] [--out DIR] [--max-concurrent N] [key=value ...]

Each (order, seed) cell is a CL run; a training job repeated by several cells (an expert of one seed, in every
order) is trained once. Leaves study.json (metrics with 95% intervals, paired comparisons, order effects,
routing), report.md and plots in ``--out``; rerunning with the same ``--out`` resumes cell by cell.
"""

import sys

from cl_service.on_ray.study import main

if __name__ == "__main__":
    sys.exit(main())

"""Serve a continual-learning run: Router + Expert replicas on Ray Serve behind the cl.v1 gRPC API.

    ray job submit --address http://127.0.0.1:8265 -- python workloads/serve_experts.py \
        --config workloads/configs/serve_dcl_mini.yaml --results runs/dcl-mini --detach [key=value ...]

With ``--detach`` the job ends once the app is RUNNING and the app stays on the cluster (stop it with
``serve shutdown``); without it the job serves until cancelled. Outside a job (no RAY_ADDRESS) a local Ray
on 127.0.0.1 is started: that is ``clsvc serve``. Serve's gRPC proxy listens on all interfaces of
``grpc_port``; set CLSVC_TOKEN (where the app is built) to require a shared token (without one it refuses
to start unless given ``--insecure``).
"""

import sys

from cl_service.on_ray.serve_start import serve_main

if __name__ == "__main__":
    sys.exit(serve_main())

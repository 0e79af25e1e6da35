"""cl-service: continual learning of multimodal LLMs (MLLM-CL benchmark, MR-LoRA) as a library.

The library knows nothing of Ray; :mod:`cl_service.on_ray` adapts it.
"""

__version__ = "0.1.0"

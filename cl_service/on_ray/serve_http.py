"""OpenAI-compatible HTTP through Ray Serve's HTTP proxy: the ingress deployment's ``__call__``.

``POST <route_prefix>/v1/chat/completions`` and ``GET <route_prefix>/v1/models`` reach the same ``Predict`` /
``ListExperts`` methods as gRPC (:mod:`cl_service.serve.openai_api`), so they call the same Router/Expert
deployments, batch with gRPC traffic and see the same catalog (hot add included).
"""

from __future__ import annotations

from typing import Any

from cl_service.serve.openai_api import Exchange, Reply, too_large


async def respond(ingress: Any, request: Any) -> Any:
    """The ingress's reply to one HTTP request (``starlette.requests.Request`` in, ``Response`` out)."""
    from starlette.responses import Response

    path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
    if root and path.startswith(root):  # Serve mounts the app at its route prefix
        path = path[len(root):]
    ex = Exchange(request.method, path, dict(request.headers), ingress.limits, ingress.token_sha256)
    reply = ex.reply
    if reply is None:
        body, n = bytearray(), 0
        async for chunk in request.stream():  # bounded: a body without Content-Length is cut off too
            n += len(chunk)
            if n > ex.body_limit:
                reply = too_large(n, ex.body_limit)
                break
            body += chunk
        if reply is None:
            reply = await _call(ingress, ex, bytes(body))
    return Response(reply.body, status_code=reply.status, media_type=reply.content_type, headers=dict(reply.headers))


async def _call(ingress: Any, ex: Exchange, body: bytes) -> Reply:
    call = ex.call(body)
    if isinstance(call, Reply):
        return call
    rpc, request, ctx = call
    try:
        return ex.finish(await getattr(ingress, rpc)(request, ctx))
    except Exception as e:  # noqa: BLE001 - mapped to a one-line error reply
        return ex.failed(e)

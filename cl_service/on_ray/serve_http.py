"""OpenAI-compatible HTTP through Ray Serve's HTTP proxy: the ingress deployment's ``__call__``.

``POST <route_prefix>/v1/chat/completions`` and ``GET <route_prefix>/v1/models`` reach the same request core as
gRPC (:mod:`cl_service.serve.openai_api`), so they call the same Router/Expert deployments, batch with gRPC
traffic and see the same catalog (hot add included). ``stream: true`` answers are a ``StreamingResponse`` of
server-sent events fed by the Expert's ``answer_stream`` as it decodes.
"""

from __future__ import annotations

from typing import Any

from cl_service.serve.openai_api import Exchange, Streamed, respond as answer, too_large


async def respond(core: Any, request: Any) -> Any:
    """The ingress's reply to one HTTP request (``starlette.requests.Request`` in, ``Response`` out)."""
    from starlette.responses import Response, StreamingResponse

    path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
    if root and path.startswith(root):  # Serve mounts the app at its route prefix
        path = path[len(root):]
    ex = Exchange(request.method, path, dict(request.headers), core.limits, core.token_sha256)
    reply = ex.reply
    try:
        if reply is None:
            body, n = bytearray(), 0
            async for chunk in request.stream():  # bounded: a body without Content-Length is cut off too
                n += len(chunk)
                if n > ex.body_limit:
                    reply = too_large(n, ex.body_limit)
                    break
                body += chunk
            if reply is None:
                reply = await answer(core, ex, bytes(body))
    except Exception as e:  # noqa: BLE001 - never Serve's plain-text 500: OpenAI's error shape
        reply = ex.failed(e)
    if isinstance(reply, Streamed):
        return StreamingResponse(reply.events, media_type=reply.content_type, headers=dict(reply.headers))
    return Response(reply.body, status_code=reply.status, media_type=reply.content_type, headers=dict(reply.headers))

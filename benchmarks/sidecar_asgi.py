"""Why the sidecar is a plain ASGI app: its router against Starlette's, without sockets.

    python -m actionpool.benchmarks.sidecar_asgi

Both apps take the flow route's shape (POST /v1/tenants/{t}/flows/{trigger},
a JSON body parsed with orjson, a JSON answer); each is called directly with a
prepared scope, so only the framework's per-request work is timed (best of
three runs of 20,000 calls). Not a timed test.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

SCOPE = {"type": "http", "method": "POST", "path": "/v1/tenants/acme/flows/post-login", "raw_path": b"",
         "headers": [(b"content-type", b"application/json")], "query_string": b"", "http_version": "1.1",
         "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 5), "root_path": ""}
BODY = b'{"user": {"email": "ada@example.com"}}'


async def plain(scope: dict[str, Any], receive: Any, send: Any) -> None:
    parts = scope["path"].split("/")
    msg = await receive()
    orjson.loads(msg["body"])
    payload = orjson.dumps({"outcome": "allow", "tenant": parts[3], "trigger": parts[5]})
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def flow(request: Request) -> Response:
        orjson.loads(await request.body())
        p = request.path_params
        return Response(orjson.dumps({"outcome": "allow", "tenant": p["tenant"], "trigger": p["trigger"]}),
                        media_type="application/json")

    return Starlette(routes=[Route("/v1/tenants/{tenant}/flows/{trigger}", flow, methods=["POST"])])


async def per_call_us(app: Any, n: int = 20000) -> float:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    for _ in range(500):
        await app(dict(SCOPE), receive, send)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            await app(dict(SCOPE), receive, send)
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


async def _main() -> None:
    a, b = await per_call_us(plain), await per_call_us(starlette_app())
    print(f"plain ASGI: {a:.1f} us/request; Starlette: {b:.1f} us/request (+{b - a:.1f} us)")


if __name__ == "__main__":
    asyncio.run(_main())

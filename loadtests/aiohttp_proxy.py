"""The Python baseline of ``make bench``: a minimal aiohttp pass-through reverse proxy.

aiohttp server + one shared ``ClientSession`` (keep-alive pool), bodies streamed both ways,
on uvloop, with no entitlement logic at all. This is what "just write the proxy in aiohttp"
costs, so the gateway's numbers can be put next to it.

    python loadtests/aiohttp_proxy.py --port 8500 --upstream http://127.0.0.1:9001
"""

from __future__ import annotations

import argparse

import uvloop
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
SESSION = web.AppKey("session", ClientSession)


def build_app(upstream: str) -> web.Application:
    upstream = upstream.rstrip("/")

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        session = ClientSession(
            connector=TCPConnector(limit=0, ttl_dns_cache=None, keepalive_timeout=75),
            timeout=ClientTimeout(total=None, sock_connect=5, sock_read=60),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
        )
        app[SESSION] = session
        yield
        await session.close()

    async def relay(request: web.Request) -> web.StreamResponse:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        data = request.content if request.body_exists else None
        async with request.app[SESSION].request(
            request.method,
            upstream + request.raw_path,
            headers=headers,
            data=data,
            allow_redirects=False,
        ) as upstream_response:
            response = web.StreamResponse(
                status=upstream_response.status, reason=upstream_response.reason
            )
            for name, value in upstream_response.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    response.headers.add(name, value)
            await response.prepare(request)
            async for chunk in upstream_response.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application(client_max_size=1 << 40)
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", relay)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="http://host:port")
    args = parser.parse_args()
    web.run_app(
        build_app(args.upstream),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        backlog=1024,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()

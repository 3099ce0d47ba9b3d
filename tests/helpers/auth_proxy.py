"""An authenticating reverse proxy for tests, in the shape of an access proxy (Cloudflare
Access) in front of an `aim server`: a request without the required headers gets 401
(none of them) or 403 (wrong values); the rest, WebSocket upgrades included, go to the
upstream on loopback.

    python auth_proxy.py --port P --upstream U --require NAME=VALUE [--require ...]

`start()` runs it in its own process, so a test can stop and restart it mid-run.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
from aiohttp import web

# Headers that belong to one hop, not to the request (RFC 9110 7.6.1), and those aiohttp sets.
HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade", "host", "content-length"}


def start(port: int, upstream: int, required: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """The proxy in its own process, once it answers (its /status/ probe gets its 401)."""
    from conftest import wait_for  # the test's side; the script itself runs without it

    arguments = ["--port", str(port), "--upstream", str(upstream)]
    arguments += [f"--require={name}={value}" for name, value in required.items()]
    with log.open("ab") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--port",
                str(port),
                "--upstream",
                str(upstream),
                *arguments,
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
        )

    def answers() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/status/", timeout=1).close()
        except urllib.error.HTTPError:
            return True  # refused, as it should be without the headers: it is up
        except OSError:
            return False
        return True

    wait_for(answers, timeout=60, interval=0.1)
    return process


def refusal(request: web.Request, required: dict[str, str]) -> web.Response | None:
    present = [name for name in required if name in request.headers]
    if not present:
        return web.Response(status=401, text="401 Unauthorized: access headers missing")
    if any(request.headers.get(name) != value for name, value in required.items()):
        return web.Response(status=403, text="403 Forbidden: access headers not accepted")
    return None


def application(upstream: int, required: dict[str, str]) -> web.Application:
    base = f"http://127.0.0.1:{upstream}"
    session: aiohttp.ClientSession | None = None

    async def forward(request: web.Request) -> web.StreamResponse:
        nonlocal session
        refused = refusal(request, required)
        if refused is not None:
            return refused
        if session is None:
            session = aiohttp.ClientSession(auto_decompress=False)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        url = base + request.rel_url.path_qs
        if request.headers.get("upgrade", "").lower() == "websocket":
            return await tunnel(request, session, url, headers)
        async with session.request(
            request.method, url, headers=headers, data=await request.read(), allow_redirects=False
        ) as answer:
            body = await answer.read()
            kept = {k: v for k, v in answer.headers.items() if k.lower() not in HOP}
            return web.Response(status=answer.status, body=body, headers=kept)

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


async def tunnel(
    request: web.Request, session: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> web.WebSocketResponse:
    """A WebSocket upgrade: both ends open, messages pumped each way until one closes."""
    drop = {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions"}
    kept = {k: v for k, v in headers.items() if k.lower() not in drop}
    async with session.ws_connect(url.replace("http://", "ws://"), headers=kept) as upstream:
        client = web.WebSocketResponse(max_msg_size=0)
        await client.prepare(request)

        async def pump(source: object, target: object) -> None:
            async for message in source:  # type: ignore[attr-defined]
                if message.type == aiohttp.WSMsgType.BINARY:
                    await target.send_bytes(message.data)  # type: ignore[attr-defined]
                elif message.type == aiohttp.WSMsgType.TEXT:
                    await target.send_str(message.data)  # type: ignore[attr-defined]
                else:
                    break
            await target.close()  # type: ignore[attr-defined]

        await asyncio.gather(pump(client, upstream), pump(upstream, client))
        return client


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", type=int, required=True)
    parser.add_argument("--require", action="append", default=[])
    args = parser.parse_args()
    required = dict(item.split("=", 1) for item in args.require)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the access log, for tests
    web.run_app(application(args.upstream, required), host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()

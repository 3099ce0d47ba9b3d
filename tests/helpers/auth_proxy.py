"""A reverse proxy for tests, in front of a real server on loopback.

In the shape of an access proxy (Cloudflare Access) in front of an `aim server`: a
request without the required headers gets 401 (none of them) or 403 (wrong values);
the rest, WebSocket upgrades included, go to the upstream. With no `--require`, every
request goes through.

It is also the fault injector in front of a real `mlflow server` (issue 13 §3): the
requests whose path contains `--watch` are counted (how many at once, the most at
once) and, while a fault is set, delayed and/or answered with a status (503, 429)
instead of being forwarded. `set_fault()` sets one and reads the counts back
(`POST /__proxy__/fault?status=503&delay=0.2`; `GET` only reads).

    python auth_proxy.py --port P --upstream U [--require NAME=VALUE ...] [--watch PATH]

`start()` runs it in its own process, so a test can stop and restart it mid-run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

# Headers that belong to one hop, not to the request (RFC 9110 7.6.1), and those aiohttp sets.
HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade", "host", "content-length"}


CONTROL = "/__proxy__/fault"


def start(
    port: int, upstream: int, required: dict[str, str], log: Path, watch: str = ""
) -> subprocess.Popen[bytes]:
    """The proxy in its own process, once it answers (on its control path)."""
    from conftest import wait_for  # the test's side; the script itself runs without it

    arguments = ["--port", str(port), "--upstream", str(upstream), f"--watch={watch}"]
    arguments += [f"--require={name}={value}" for name, value in required.items()]
    with log.open("ab") as output:
        process = subprocess.Popen(
            [sys.executable, __file__, *arguments], stdout=output, stderr=subprocess.STDOUT
        )

    def answers() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            set_fault(port, read_only=True)
        except OSError:
            return False
        return True

    wait_for(answers, timeout=60, interval=0.1)
    return process


def set_fault(port: int, status: int = 0, delay: float = 0.0, *, read_only: bool = False) -> Any:
    """Set the fault (status 0 and delay 0: none) and reset the most-at-once count; return the
    counts as they were: {"in_flight", "most_in_flight", "faulted", "forwarded"}."""
    query = f"?status={status}&delay={delay}"
    method = "GET" if read_only else "POST"
    call = urllib.request.Request(f"http://127.0.0.1:{port}{CONTROL}{query}", method=method)
    with urllib.request.urlopen(call, timeout=10) as response:
        return json.loads(response.read())


class Faults:
    """The watched requests' counts and the fault set on them now."""

    def __init__(self, watch: str) -> None:
        self.watch = watch
        self.status = 0
        self.delay = 0.0
        self.counts = {"in_flight": 0, "most_in_flight": 0, "faulted": 0, "forwarded": 0}

    async def control(self, request: web.Request) -> web.Response:
        counts = dict(self.counts)
        if request.method == "POST":
            self.status = int(request.query.get("status") or 0)
            self.delay = float(request.query.get("delay") or 0)
            self.counts["most_in_flight"] = self.counts["in_flight"]
        return web.json_response(counts)

    def watches(self, request: web.Request) -> bool:
        return bool(self.watch) and self.watch in request.path

    def begin(self) -> None:
        counts = self.counts
        counts["in_flight"] += 1
        counts["most_in_flight"] = max(counts["most_in_flight"], counts["in_flight"])

    async def fault(self) -> web.Response | None:
        """The answer the fault gives in place of the upstream's, after its delay; None when
        the request is to go through."""
        if self.delay:
            await asyncio.sleep(self.delay)
        if not self.status:
            self.counts["forwarded"] += 1
            return None
        self.counts["faulted"] += 1
        return web.Response(status=self.status, text=f"{self.status} injected by the test proxy")


def refusal(request: web.Request, required: dict[str, str]) -> web.Response | None:
    if not required:
        return None
    present = [name for name in required if name in request.headers]
    if not present:
        return web.Response(status=401, text="401 Unauthorized: access headers missing")
    if any(request.headers.get(name) != value for name, value in required.items()):
        return web.Response(status=403, text="403 Forbidden: access headers not accepted")
    return None


def application(upstream: int, required: dict[str, str], watch: str = "") -> web.Application:
    base = f"http://127.0.0.1:{upstream}"
    session: aiohttp.ClientSession | None = None
    faults = Faults(watch)

    async def forward(request: web.Request) -> web.StreamResponse:
        refused = refusal(request, required)
        if refused is not None:
            return refused
        if not faults.watches(request):
            return await through(request)
        faults.begin()
        try:
            return await faults.fault() or await through(request)
        finally:
            faults.counts["in_flight"] -= 1

    async def through(request: web.Request) -> web.StreamResponse:
        nonlocal session
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
    app.router.add_route("*", CONTROL, faults.control)
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
    parser.add_argument("--watch", default="")
    args = parser.parse_args()
    required = dict(item.split("=", 1) for item in args.require)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the access log, for tests
    app = application(args.upstream, required, args.watch)
    web.run_app(app, host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()

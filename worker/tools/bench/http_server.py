"""The HTTP server library comparison behind worker/api: `python -m worker.tools.bench.http_server`.

Each candidate serves the same two routes in a process of its own, on uvloop as the daemon
runs: `GET /healthz` (a small JSON answer) and `POST /telemetry` (a JSON body of 10 readings
parsed with orjson, a JSON answer). Client processes keep `--connections` keep-alive
connections busy for `--seconds`; the bench prints, per candidate, requests/s and the
server's CPU-milliseconds per 1,000 requests (utime + stime from /proc, the server process
alone). Runs alternate between candidates, so a noisy neighbour on the machine hits both.
A candidate whose packages are not installed is skipped with a line saying so
(`pip install starlette uvicorn httptools` for the second one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
from typing import Any

import orjson

from worker.tools.bench.support import cpu_seconds
from worker.tools.embedded import free_port

MODULE = "worker.tools.bench.http_server"
CANDIDATES = {
    "aiohttp": ("aiohttp",),
    "starlette+uvicorn": ("starlette", "uvicorn", "httptools"),
}
READINGS = [{"measurement": f"m{i}", "value": 20.5 + i, "timestamp": 1765000000000 + i} for i in range(10)]
BODY = orjson.dumps({"device_key": "bench-1", "readings": READINGS})
HEALTHZ = b'{"status":"alive"}'


def _answer(body: bytes) -> bytes:
    return orjson.dumps({"accepted": len(orjson.loads(body)["readings"])})


def serve_aiohttp(port: int) -> None:
    from aiohttp import web

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(body=HEALTHZ, content_type="application/json")

    async def telemetry(request: web.Request) -> web.Response:
        return web.Response(body=_answer(await request.read()), content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_post("/telemetry", telemetry)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    _run(main())


def serve_starlette(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def healthz(request: Request) -> Response:
        return Response(HEALTHZ, media_type="application/json")

    async def telemetry(request: Request) -> Response:
        return Response(_answer(await request.body()), media_type="application/json")

    app = Starlette(routes=[Route("/healthz", healthz), Route("/telemetry", telemetry, methods=["POST"])])
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, loop="none", http="httptools", access_log=False, log_level="warning"
    )
    _run(uvicorn.Server(config).serve())


def _run(main: Any) -> None:
    import uvloop

    uvloop.run(main)


async def _client(port: int, path: str, connections: int, seconds: float) -> int:
    """Requests answered over `connections` keep-alive connections during `seconds`."""
    if path == "/telemetry":
        head = "POST /telemetry HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
        request = f"{head}Content-Length: {len(BODY)}\r\n\r\n".encode() + BODY
    else:
        request = b"GET /healthz HTTP/1.1\r\nHost: b\r\n\r\n"
    deadline = time.monotonic() + seconds

    async def one() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        done = 0
        while time.monotonic() < deadline:
            writer.write(request)
            headers = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in headers.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            done += 1
        writer.close()
        return done

    return sum(await asyncio.gather(*(one() for _ in range(connections))))


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError("the server did not listen within 30 s")


def measure(candidate: str, path: str, args: argparse.Namespace) -> tuple[float, float]:
    """(requests/s, server CPU-ms per 1,000 requests) of one run."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", MODULE, "--serve", candidate, "--port", str(port)])
    try:
        _wait_listening(port, server)
        per_client = max(1, args.connections // args.clients)
        command = [sys.executable, "-m", MODULE, "--load", path, "--port", str(port)]
        command += ["--connections", str(per_client), "--seconds", str(args.seconds)]
        cpu_before = cpu_seconds([server.pid])
        started = time.monotonic()
        clients = [subprocess.Popen(command, stdout=subprocess.PIPE) for _ in range(args.clients)]
        answered = sum(int(client.communicate()[0]) for client in clients)
        elapsed = time.monotonic() - started
        cpu = cpu_seconds([server.pid]) - cpu_before
        return answered / elapsed, cpu / answered * 1e6
    finally:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections in all")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--serve", choices=CANDIDATES, help=argparse.SUPPRESS)
    parser.add_argument("--load", choices=("/healthz", "/telemetry"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        (serve_aiohttp if args.serve == "aiohttp" else serve_starlette)(args.port)
        return
    if args.load:
        print(asyncio.run(_client(args.port, args.load, args.connections, args.seconds)))
        return
    present = [name for name, needs in CANDIDATES.items() if all(importlib.util.find_spec(m) for m in needs)]
    for name in CANDIDATES.keys() - present:
        print(f"{name}: skipped, needs {' '.join(CANDIDATES[name])}")
    print(f"{os.cpu_count()} cores, {args.connections} connections, {args.seconds:g} s per run")
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(args.repeat):
        for path in ("/healthz", "/telemetry"):
            for name in present:
                results.setdefault((name, path), []).append(measure(name, path, args))
    print(f"{'server':<20} {'route':<12} {'requests/s':>11} {'CPU ms/1k req':>14}")
    for (name, path), runs in sorted(results.items(), key=lambda item: (item[0][1], item[0][0])):
        rate = sum(r for r, _ in runs) / len(runs)
        cpu = sum(c for _, c in runs) / len(runs)
        print(f"{name:<20} {path:<12} {rate:>11,.0f} {cpu:>14.1f}")


if __name__ == "__main__":
    main()

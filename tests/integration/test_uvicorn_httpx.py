"""A real library on the loop under test: uvicorn serving ASGI apps, httpx as the client.

Every test runs ``uvicorn.Server.serve()`` as a task on the ``loop`` fixture's loop (both
of uvicorn's HTTP/1.1 implementations: ``httptools`` and ``h11``) and talks to it with
``httpx.AsyncClient`` (httpcore over AnyIO on the same loop), so each scenario runs on the
stdlib loop and on ferroloop: routing and JSON, keep-alive, streamed (chunked) bodies both
ways, flow control under a slow app, pipelining, lifespan events, 200 concurrent requests,
an ASGI websocket endpoint, graceful shutdown, HTTPS and a Unix socket.  The apps are plain
ASGI callables.  The loop fixture fails a test whose loop exception handler was called,
and pytest turns warnings (unclosed transports) into errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import ssl

import httpx  # a test dependency (pyproject.toml): missing, the module fails to import
import pytest
import uvicorn
from netutil import MiB, assert_bytes_equal, pattern, pattern_chunks, run
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosedError

HOST = "127.0.0.1"
STREAM_SIZE = 6 * MiB + 12_345  # not a multiple of any chunk size used below

HTTP_IMPLEMENTATIONS = [
    pytest.param("httptools", id="httptools"),
    pytest.param("h11", id="h11"),
]


@pytest.fixture(params=HTTP_IMPLEMENTATIONS)
def http(request) -> str:
    """uvicorn's ``http=`` implementation under test."""
    return request.param


# --------------------------------------------------------------------------- helpers


@dataclasses.dataclass
class Running:
    server: uvicorn.Server
    url: str
    port: int


@contextlib.asynccontextmanager
async def running(app, http: str, **config):
    """Run *app* under uvicorn on 127.0.0.1 (a free port); stop it gracefully on exit."""
    settings = {
        "host": HOST,
        "port": 0,
        "http": http,
        "loop": "none",
        "lifespan": "on",
        "log_level": "warning",
        "log_config": None,  # leave the logging configuration of the test run alone
        "access_log": False,
    }
    settings.update(config)
    server = uvicorn.Server(uvicorn.Config(app, **settings))
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                assert not serving.done(), "uvicorn stopped before it started"
                await asyncio.sleep(0.01)
        sockname = server.servers[0].sockets[0].getsockname()
        if isinstance(sockname, str):  # a Unix socket (uds=...)
            yield Running(server, f"unix:{sockname}", 0)
        else:
            yield Running(server, f"http://{HOST}:{sockname[1]}", sockname[1])
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 15)


def http_client(running: Running, **kwargs) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` for *running* (no proxies or netrc from the environment)."""
    return httpx.AsyncClient(base_url=running.url, trust_env=False, **kwargs)


async def read_body(receive) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        assert message["type"] == "http.request", message
        body.extend(message.get("body", b""))
        if not message.get("more_body", False):
            return bytes(body)


async def respond(send, status: int, body: bytes, content_type: bytes = b"text/plain") -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def respond_json(send, document, status: int = 200) -> None:
    await respond(send, status, json.dumps(document).encode(), b"application/json")


class App:
    """A small ASGI app; subclasses add routes as ``route_<METHOD>_<name>`` methods.

    It records the lifespan events it handled and the client address of every request.
    """

    def __init__(self) -> None:
        self.lifespan_events: list[str] = []
        self.clients: list[tuple[str, int]] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            await self.lifespan(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await self.websocket(scope, receive, send)
            return
        assert scope["type"] == "http"
        client = scope.get("client")  # None over a Unix socket
        self.clients.append(tuple(client) if client is not None else None)
        name = scope["path"].strip("/").split("/")[0] or "index"
        handler = getattr(self, f"route_{scope['method']}_{name}", None)
        if handler is None:
            allowed = sorted(attr.split("_")[1] for attr in dir(self) if attr.endswith(f"_{name}"))
            if allowed:
                await send(
                    {
                        "type": "http.response.start",
                        "status": 405,
                        "headers": [(b"allow", ", ".join(allowed).encode())],
                    }
                )
                await send({"type": "http.response.body", "body": b""})
            else:
                await respond(send, 404, b"not found")
            return
        await handler(scope, receive, send)

    async def lifespan(self, scope, receive, send):
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.lifespan_events.append("startup")
                scope["state"]["greeting"] = "hello"
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.lifespan_events.append("shutdown")
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def websocket(self, scope, receive, send):
        raise AssertionError("no websocket route")

    async def route_GET_hello(self, scope, receive, send):
        name = scope["path"].split("/")[2]
        query = dict(
            part.split("=", 1) for part in scope["query_string"].decode().split("&") if part
        )
        greeting = query.get("greeting", scope["state"]["greeting"])
        await respond(send, 200, f"{greeting}, {name}!".encode())

    async def route_POST_json(self, scope, receive, send):
        document = json.loads(await read_body(receive))
        await respond_json(
            send, {"received": document, "method": scope["method"], "path": scope["path"]}
        )

    async def route_GET_who(self, scope, receive, send):
        await asyncio.sleep(0)  # let concurrent requests queue up behind this one
        await respond_json(send, {"client": list(scope["client"])})


# --------------------------------------------------------------------------- routes, JSON


def test_routes_dispatch_by_path_and_method_and_json_round_trips(loop, http):
    document = {
        "text": "grüße, 世界 \u2603",
        "int": 2**62 + 1,
        "float": 0.1,
        "list": [1, None, True, False, "x"],
        "nested": {"a": {"b": {"c": []}}},
    }

    async def main():
        async with running(App(), http) as server, http_client(server) as client:
            resp = await client.get("/hello/ferro", params={"greeting": "hi"})
            assert resp.status_code == 200
            assert resp.headers["content-type"] == "text/plain"
            assert resp.text == "hi, ferro!"
            resp = await client.post("/json", json=document)
            assert resp.status_code == 200
            assert resp.headers["content-type"] == "application/json"
            assert resp.json() == {"received": document, "method": "POST", "path": "/json"}
            resp = await client.get("/nowhere")
            assert resp.status_code == 404
            resp = await client.get("/json")
            assert resp.status_code == 405
            assert resp.headers["allow"] == "POST"
            assert resp.http_version == "HTTP/1.1"

    run(loop, main())


# --------------------------------------------------------------------------- keep-alive


def test_keep_alive_serves_sequential_and_queued_requests_over_one_connection(loop, http):
    async def main():
        app = App()
        async with running(app, http) as server:
            limits = httpx.Limits(max_connections=1)
            async with http_client(server, limits=limits) as client:
                first = [(await client.get("/who")).json()["client"] for _ in range(20)]
                queued = await asyncio.gather(*(client.get("/who") for _ in range(20)))
        assert all(resp.status_code == 200 for resp in queued)
        assert len(app.clients) == 40
        assert len(set(app.clients)) == 1, set(app.clients)
        (peer,) = set(app.clients)
        assert all(address == list(peer) for address in first)
        assert all(resp.json()["client"] == list(peer) for resp in queued)

    run(loop, main())


def test_connection_close_makes_each_request_use_a_new_connection(loop, http):
    # The counterpart of the test above: the client-address check can tell one reused
    # connection from several fresh ones.
    async def main():
        app = App()
        async with running(app, http) as server, http_client(server) as client:
            for _ in range(3):
                resp = await client.get("/who", headers={"Connection": "close"})
                assert resp.status_code == 200
                assert resp.headers["connection"] == "close"
        assert len(app.clients) == 3
        assert len(set(app.clients)) == 3, app.clients

    run(loop, main())


def test_idle_keep_alive_connection_is_closed_by_the_server_after_its_timeout(loop, http):
    async def main():
        app = App()
        async with running(app, http, timeout_keep_alive=0.2) as server:
            limits = httpx.Limits(max_connections=1)
            async with http_client(server, limits=limits) as client:
                assert (await client.get("/who")).status_code == 200
                assert (await client.get("/who")).status_code == 200
                await asyncio.sleep(0.6)  # the server's keep-alive timer closes it
                assert not server.server.server_state.connections
                # httpx sees the closed connection in its pool and opens a new one.
                assert (await client.get("/who")).status_code == 200
        return app.clients

    clients = run(loop, main())
    assert len(clients) == 3
    assert clients[0] == clients[1]
    assert clients[2] != clients[0]


# --------------------------------------------------------------------------- streamed bodies


class StreamingApp(App):
    def __init__(self) -> None:
        super().__init__()
        self.upload_chunks: list[int] = []
        self.uploaded = bytearray()
        self.upload_headers: dict = {}

    async def route_POST_upload(self, scope, receive, send):
        self.upload_headers = dict(scope["headers"])
        while True:
            message = await receive()
            assert message["type"] == "http.request", message
            if message["body"]:
                self.upload_chunks.append(len(message["body"]))
                self.uploaded.extend(message["body"])
            if not message.get("more_body", False):
                break
        await respond_json(send, {"size": len(self.uploaded)})

    async def route_GET_download(self, scope, receive, send):
        # No content-length: the server sends the body chunked.
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/octet-stream")],
            }
        )
        offset = 0
        step = 100_003
        while offset < STREAM_SIZE:
            n = min(step, STREAM_SIZE - offset)
            await send(
                {"type": "http.response.body", "body": pattern(n, offset), "more_body": True}
            )
            offset += n
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def test_streamed_chunked_request_body_arrives_byte_for_byte(loop, http):
    app = StreamingApp()

    async def main():
        async with running(app, http) as server, http_client(server) as client:
            resp = await client.post("/upload", content=pattern_chunks(STREAM_SIZE))
            assert resp.status_code == 200
            assert resp.json() == {"size": STREAM_SIZE}

    run(loop, main(), timeout=30)
    assert app.upload_headers[b"transfer-encoding"] == b"chunked"
    assert b"content-length" not in app.upload_headers
    assert len(app.upload_chunks) > 1
    assert_bytes_equal(app.uploaded, pattern(STREAM_SIZE))


def test_streamed_chunked_response_body_arrives_byte_for_byte(loop, http):
    async def main():
        async with running(StreamingApp(), http) as server, http_client(server) as client:
            async with client.stream("GET", "/download") as resp:
                assert resp.status_code == 200
                assert resp.headers["transfer-encoding"] == "chunked"
                assert "content-length" not in resp.headers
                got = bytearray()
                reads = 0
                async for chunk in resp.aiter_bytes():
                    got.extend(chunk)
                    reads += 1
            # The connection went back to the pool and serves the next request.
            resp = await client.get("/hello/again")
            assert resp.text == "hello, again!"
        return got, reads

    got, reads = run(loop, main(), timeout=30)
    assert reads > 1
    assert_bytes_equal(got, pattern(STREAM_SIZE))


def test_fixed_length_upload_and_download_of_several_mib(loop, http):
    payload = pattern(3 * MiB + 1, 5)

    class Echo(App):
        async def route_PUT_echo(self, scope, receive, send):
            body = await read_body(receive)
            await respond(send, 200, body, b"application/octet-stream")

    async def main():
        async with running(Echo(), http) as server, http_client(server) as client:
            resp = await client.put("/echo", content=payload)
            assert resp.status_code == 200
            assert resp.headers["content-length"] == str(len(payload))
            return resp.content

    assert_bytes_equal(run(loop, main(), timeout=30), payload)


def test_a_slow_app_reading_a_large_body_pauses_and_resumes_the_transport(loop, http):
    # uvicorn pauses reading from the socket while the app has not taken the buffered
    # body (transport.pause_reading/resume_reading); the body must still be exact.
    payload = pattern(4 * MiB + 3, 21)

    class SlowReader(App):
        def __init__(self) -> None:
            super().__init__()
            self.received = bytearray()
            self.messages = 0

        async def route_POST_slow(self, scope, receive, send):
            while True:
                message = await receive()
                self.messages += 1
                self.received.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    break
                await asyncio.sleep(0.002)  # slower than the network
            await respond_json(send, {"size": len(self.received)})

    app = SlowReader()

    async def main():
        async with running(app, http) as server, http_client(server, timeout=30) as client:
            resp = await client.post("/slow", content=payload)
            assert resp.json() == {"size": len(payload)}

    run(loop, main(), timeout=60)
    assert app.messages > 1
    assert_bytes_equal(app.received, payload)


def test_pipelined_raw_requests_are_answered_in_order(loop, http):
    async def main():
        async with running(App(), http) as server:
            reader, writer = await asyncio.open_connection(HOST, server.port)
            try:
                requests = b"".join(
                    f"GET /hello/p{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(20)
                )
                writer.write(
                    requests + b"GET /hello/last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                await writer.drain()
                async with asyncio.timeout(10):
                    raw = await reader.read()  # until the server closes
            finally:
                writer.close()
                await writer.wait_closed()
        return raw

    raw = run(loop, main())
    bodies = []
    rest = raw
    while rest:
        head, _, rest = rest.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK"), head
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        bodies.append(rest[:length])
        rest = rest[length:]
    assert bodies == [f"hello, p{i}!".encode() for i in range(20)] + [b"hello, last!"]


# --------------------------------------------------------------------------- lifespan


def test_lifespan_startup_runs_before_serving_and_shutdown_after(loop, http):
    app = App()
    seen_during_serving = []

    async def main():
        async with running(app, http) as server, http_client(server) as client:
            seen_during_serving.extend(app.lifespan_events)
            # The state the startup handler set is visible to requests.
            resp = await client.get("/hello/state")
            assert resp.text == "hello, state!"
        return server

    server = run(loop, main())
    assert seen_during_serving == ["startup"]
    assert app.lifespan_events == ["startup", "shutdown"]
    assert server.server.started
    assert all(not s.is_serving() for s in server.server.servers)


def test_lifespan_startup_failure_stops_uvicorn_before_it_listens(loop, http, caplog):
    class FailingStartup(App):
        async def lifespan(self, scope, receive, send):
            message = await receive()
            assert message["type"] == "lifespan.startup"
            await send({"type": "lifespan.startup.failed", "message": "no database"})

    async def main():
        server = uvicorn.Server(
            uvicorn.Config(
                FailingStartup(),
                host=HOST,
                port=0,
                http=http,
                lifespan="on",
                log_level="warning",
                log_config=None,
            )
        )
        # uvicorn exits with sys.exit(3): caught in this coroutine, before it could reach
        # the task (a SystemExit leaving a task's step stops the loop).
        with pytest.raises(SystemExit) as info:
            async with asyncio.timeout(10):
                await server.serve()
        assert info.value.code == 3
        assert not server.started

    with caplog.at_level(logging.ERROR, logger="uvicorn.error"):
        run(loop, main())
    assert any("no database" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- concurrency


def test_two_hundred_concurrent_requests_all_get_their_own_answer(loop, http):
    count = 200

    class Numbered(App):
        async def route_GET_n(self, scope, receive, send):
            n = int(scope["path"].split("/")[2])
            await asyncio.sleep(0.001 * (n % 7))  # finish out of order
            await respond_json(send, {"n": n, "square": n * n})

    async def main():
        app = Numbered()
        async with running(app, http, backlog=1024) as server:
            limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)
            async with http_client(server, limits=limits, timeout=30) as client:
                responses = await asyncio.gather(*(client.get(f"/n/{n}") for n in range(count)))
        return app, responses

    app, responses = run(loop, main(), timeout=60)
    assert [resp.status_code for resp in responses] == [200] * count
    assert [resp.json() for resp in responses] == [{"n": n, "square": n * n} for n in range(count)]
    assert len(app.clients) == count
    # At most 50 connections, all kept alive: every one of them served several requests.
    assert 1 <= len(set(app.clients)) <= 50, len(set(app.clients))


# --------------------------------------------------------------------------- websocket


class WebSocketApp(App):
    def __init__(self) -> None:
        super().__init__()
        self.disconnect_codes: list[int] = []

    async def websocket(self, scope, receive, send):
        message = await receive()
        assert message["type"] == "websocket.connect"
        if scope["path"] != "/ws":
            await send({"type": "websocket.close", "code": 4404, "reason": "no such endpoint"})
            return
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                self.disconnect_codes.append(message["code"])
                return
            if message.get("text") == "bye":
                await send({"type": "websocket.close", "code": 4000, "reason": "see you"})
                return
            if message.get("text") is not None:
                await send({"type": "websocket.send", "text": message["text"].upper()})
            else:
                await send({"type": "websocket.send", "bytes": message["bytes"][::-1]})


def test_asgi_websocket_endpoint_echoes_and_closes_with_the_apps_code(loop, http):
    app = WebSocketApp()
    count = 1000

    def message(i: int):
        return f"text {i} ü" if i % 2 else pattern(i * 13 % 5000, i)

    def answer(item):
        return item.upper() if isinstance(item, str) else item[::-1]

    async def main():
        async with running(app, http, ws="auto") as server:
            uri = f"ws://{HOST}:{server.port}"
            async with ws_connect(f"{uri}/ws", proxy=None) as ws:

                async def send_all():
                    for i in range(count):
                        await ws.send(message(i))

                sender = asyncio.create_task(send_all())
                got = [await asyncio.wait_for(ws.recv(), 10) for _ in range(count)]
                await sender
            assert ws.close_code == 1000

            async with ws_connect(f"{uri}/ws", proxy=None) as ws:
                await ws.send("bye")
                with pytest.raises(ConnectionClosedError) as info:
                    await asyncio.wait_for(ws.recv(), 10)
                assert info.value.rcvd.code == 4000
                assert info.value.rcvd.reason == "see you"
        return got

    got = run(loop, main(), timeout=30)
    expected = [answer(message(i)) for i in range(count)]
    assert len(got) == count
    for i, (received, sent) in enumerate(zip(got, expected, strict=True)):
        assert type(received) is type(sent), i
        assert received == sent, i
    assert app.disconnect_codes == [1000]


def test_server_shutdown_closes_an_open_websocket_with_1012(loop, http):
    app = WebSocketApp()

    async def main():
        async with running(app, http, ws="auto") as server:
            ws = await ws_connect(f"ws://{HOST}:{server.port}/ws", proxy=None)
            await ws.send("up")
            assert await asyncio.wait_for(ws.recv(), 10) == "UP"
            server.server.should_exit = True
            with pytest.raises(ConnectionClosedError) as info:  # 1012: service restart
                await asyncio.wait_for(ws.recv(), 10)
            assert info.value.rcvd.code == 1012
            await ws.close()
        assert app.disconnect_codes == [1012]

    run(loop, main(), timeout=30)


# --------------------------------------------------------------------------- shutdown


def test_graceful_shutdown_finishes_the_request_in_flight(loop, http):
    class Slow(App):
        def __init__(self) -> None:
            super().__init__()
            self.entered = asyncio.Event()
            self.release = asyncio.Event()

        async def route_GET_slow(self, scope, receive, send):
            self.entered.set()
            await self.release.wait()
            await respond(send, 200, b"finished after shutdown began")

    async def main():
        app = Slow()
        async with running(app, http) as server, http_client(server) as client:
            request = asyncio.create_task(client.get("/slow"))
            await asyncio.wait_for(app.entered.wait(), 10)
            server.server.should_exit = True
            # uvicorn stops listening, then waits for the request in flight.
            async with asyncio.timeout(5):
                while any(s.is_serving() for s in server.server.servers):
                    await asyncio.sleep(0.01)
            with pytest.raises(httpx.ConnectError):
                async with http_client(server) as other:
                    await other.get("/hello/late")
            assert app.lifespan_events == ["startup"]
            assert not request.done()
            app.release.set()
            resp = await asyncio.wait_for(request, 10)
            assert resp.status_code == 200
            assert resp.text == "finished after shutdown began"
        assert app.lifespan_events == ["startup", "shutdown"]

    run(loop, main(), timeout=30)


def test_graceful_shutdown_timeout_cancels_a_stuck_request(loop, http, caplog):
    class Stuck(App):
        def __init__(self) -> None:
            super().__init__()
            self.entered = asyncio.Event()
            self.cancelled = False

        async def route_GET_stuck(self, scope, receive, send):
            self.entered.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled = True
                raise

    async def main():
        app = Stuck()
        async with running(app, http, timeout_graceful_shutdown=0.3) as server:
            async with http_client(server) as client:
                request = asyncio.create_task(client.get("/stuck"))
                await asyncio.wait_for(app.entered.wait(), 10)
                server.server.should_exit = True
                resp = await asyncio.wait_for(request, 10)
                # uvicorn cancels the app's task: no response was started, so a 500.
                assert resp.status_code == 500
        assert app.cancelled
        assert app.lifespan_events == ["startup", "shutdown"]

    with caplog.at_level(logging.ERROR, logger="uvicorn.error"):
        run(loop, main(), timeout=30)
    assert any("timeout graceful shutdown exceeded" in r.getMessage() for r in caplog.records)


def test_app_sees_http_disconnect_when_the_client_goes_away(loop, http):
    class Waiting(App):
        def __init__(self) -> None:
            super().__init__()
            self.entered = asyncio.Event()
            self.after_body: list = []

        async def route_POST_wait(self, scope, receive, send):
            assert await read_body(receive) == b"payload"
            self.entered.set()
            # The next receive() only returns once the client has disconnected.
            self.after_body.append(await receive())

    async def main():
        app = Waiting()
        async with running(app, http) as server, http_client(server) as client:
            request = asyncio.create_task(client.post("/wait", content=b"payload"))
            await asyncio.wait_for(app.entered.wait(), 10)
            request.cancel()  # httpx drops the connection
            with pytest.raises(asyncio.CancelledError):
                await request
            async with asyncio.timeout(5):
                while not app.after_body:
                    await asyncio.sleep(0.01)
            assert app.after_body == [{"type": "http.disconnect"}]

    run(loop, main())


def test_handler_exception_becomes_a_500_and_is_logged(loop, http, caplog):
    class Boom(Exception):
        pass

    class Broken(App):
        async def route_GET_broken(self, scope, receive, send):
            raise Boom("handler failed")

    async def main():
        async with running(Broken(), http) as server, http_client(server) as client:
            resp = await client.get("/broken")
            assert resp.status_code == 500
            assert resp.text == "Internal Server Error"
            resp = await client.get("/hello/after")
            assert resp.text == "hello, after!"

    with caplog.at_level(logging.ERROR, logger="uvicorn.error"):
        run(loop, main())
    logged = [r for r in caplog.records if r.name == "uvicorn.error" and r.exc_info]
    assert len(logged) == 1
    assert logged[0].exc_info[0] is Boom


# --------------------------------------------------------------------------- TLS, Unix socket


def test_https_verifies_the_server_and_serves_json_and_a_large_body(loop, http, tls_files):
    cert, key = tls_files
    client_context = ssl.create_default_context(cafile=str(cert))
    big = pattern(2 * MiB + 7, 99)

    class Secure(App):
        async def route_GET_secure(self, scope, receive, send):
            await respond_json(send, {"scheme": scope["scheme"]})

        async def route_GET_blob(self, scope, receive, send):
            await respond(send, 200, big, b"application/octet-stream")

    async def main():
        app = Secure()
        config = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
        async with running(app, http, **config) as server:
            url = f"https://localhost:{server.port}"
            async with httpx.AsyncClient(
                base_url=url, verify=client_context, trust_env=False
            ) as client:
                resp = await client.get("/secure")
                assert resp.json() == {"scheme": "https"}
                resp = await client.post("/json", json={"over": "tls"})
                assert resp.json()["received"] == {"over": "tls"}
                resp = await client.get("/blob")
                got = resp.content
            untrusting = ssl.create_default_context()  # the system CAs: not our certificate
            async with httpx.AsyncClient(base_url=url, verify=untrusting, trust_env=False) as other:
                with pytest.raises(httpx.ConnectError) as info:
                    await other.get("/secure")
            assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
        assert len(set(app.clients)) == 1  # keep-alive over TLS too
        return got

    assert_bytes_equal(run(loop, main(), timeout=30), big)


@pytest.fixture
def unix_path(tmp_path):
    path = os.path.join(tmp_path, "uvicorn.sock")
    if len(os.fsencode(path)) > 100:  # sun_path holds 108 bytes
        pytest.skip("temporary directory path too long for a Unix socket")
    return path


def test_unix_socket_server_serves_requests_through_a_uds_transport(loop, http, unix_path):
    payload = pattern(MiB + 5, 8)

    class Echo(App):
        async def route_PUT_echo(self, scope, receive, send):
            body = await read_body(receive)
            await respond(send, 200, body, b"application/octet-stream")

    app = Echo()

    async def main():
        async with running(app, http, uds=unix_path) as server:
            transport = httpx.AsyncHTTPTransport(uds=unix_path)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://localhost", trust_env=False
            ) as client:
                resp = await client.get("/hello/unix")
                assert resp.text == "hello, unix!"
                resp = await client.put("/echo", content=payload)
                got = resp.content
        return got, server

    got, server = run(loop, main(), timeout=30)
    assert_bytes_equal(got, payload)
    assert server.url == f"unix:{unix_path}"
    assert app.clients == [None, None]  # a Unix peer has no address

"""A real library on the loop under test: an aiohttp server and aiohttp's client.

Every test starts an aiohttp web application (``web.AppRunner`` + a site) and talks to it
with ``aiohttp.ClientSession`` (or raw asyncio streams), all on the ``loop`` fixture's loop,
so each scenario runs on the stdlib loop and on ferroloop.  The loop fixture fails a test
whose loop exception handler was called, and pytest turns warnings (unclosed sessions,
unclosed transports) into errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import time

import aiohttp  # a test dependency (pyproject.toml): missing, the module fails to import
import pytest
from aiohttp import WSMsgType, web
from netutil import MiB, assert_bytes_equal, pattern, pattern_chunks, run

HOST = "127.0.0.1"
STREAM_SIZE = 6 * MiB + 12_345  # not a multiple of any chunk size used below


# --------------------------------------------------------------------------- helpers


@contextlib.asynccontextmanager
async def serving(app: web.Application, *, ssl_context=None, unix_path=None):
    """Serve *app* on 127.0.0.1 port 0 (or *unix_path*); yield the base URL."""
    runner = web.AppRunner(app, shutdown_timeout=2.0)
    await runner.setup()
    try:
        if unix_path is not None:
            site = web.UnixSite(runner, unix_path)
            await site.start()
            yield "http://localhost"
        else:
            site = web.TCPSite(runner, HOST, 0, ssl_context=ssl_context)
            await site.start()
            port = runner.addresses[0][1]
            if ssl_context is not None:
                yield f"https://localhost:{port}"
            else:
                yield f"http://{HOST}:{port}"
    finally:
        await runner.cleanup()


def server_port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def hello(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    greeting = request.query.get("greeting", "hello")
    return web.Response(text=f"{greeting}, {name}!")


async def json_echo(request: web.Request) -> web.Response:
    body = await request.json()
    return web.json_response({"received": body, "method": request.method, "path": request.path})


def basic_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/hello/{name}", hello)
    app.router.add_post("/json", json_echo)
    return app


# --------------------------------------------------------------------------- routes, JSON


def test_routes_dispatch_by_path_and_method_and_json_round_trips(loop):
    document = {
        "text": "grüße, 世界 \u2603",
        "int": 2**62 + 1,
        "float": 0.1,
        "list": [1, None, True, False, "x"],
        "nested": {"a": {"b": {"c": []}}},
    }

    async def main():
        async with serving(basic_app()) as url, aiohttp.ClientSession() as session:
            async with session.get(f"{url}/hello/ferro", params={"greeting": "hi"}) as resp:
                assert resp.status == 200
                assert resp.content_type == "text/plain"
                assert await resp.text() == "hi, ferro!"
            async with session.post(f"{url}/json", json=document) as resp:
                assert resp.status == 200
                assert resp.content_type == "application/json"
                assert await resp.json() == {
                    "received": document,
                    "method": "POST",
                    "path": "/json",
                }
            async with session.get(f"{url}/nowhere") as resp:
                assert resp.status == 404
            async with session.get(f"{url}/json") as resp:
                assert resp.status == 405
                assert resp.headers["Allow"] == "POST"

    run(loop, main())


# --------------------------------------------------------------------------- keep-alive


def connection_identity_app() -> tuple[web.Application, list]:
    """An app whose ``/who`` records (peername, transport id) of each request."""
    seen: list = []

    async def who(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername")
        seen.append((peer, id(request.transport)))
        await asyncio.sleep(0)  # let concurrent requests queue up behind this one
        return web.json_response({"peer": list(peer), "keep_alive": request.keep_alive})

    app = web.Application()
    app.router.add_get("/who", who)
    return app, seen


def connection_counting_trace() -> tuple[aiohttp.TraceConfig, dict]:
    """A client trace config counting created and reused connections."""
    counts = {"created": 0, "reused": 0}

    async def created(session, context, params):
        counts["created"] += 1

    async def reused(session, context, params):
        counts["reused"] += 1

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(created)
    trace.on_connection_reuseconn.append(reused)
    return trace, counts


def test_keep_alive_serves_sequential_and_queued_requests_over_one_connection(loop):
    async def main():
        app, seen = connection_identity_app()
        trace, counts = connection_counting_trace()
        async with serving(app) as url:
            connector = aiohttp.TCPConnector(limit=1)
            async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
                for _ in range(10):
                    async with session.get(f"{url}/who") as resp:
                        assert resp.status == 200
                        assert (await resp.json())["keep_alive"] is True

                async def fetch():
                    async with session.get(f"{url}/who") as resp:
                        return await resp.json()

                replies = await asyncio.gather(*(fetch() for _ in range(10)))
        assert counts == {"created": 1, "reused": 19}
        assert len(seen) == 20
        assert len({peer for peer, _ in seen}) == 1, seen
        assert len({transport_id for _, transport_id in seen}) == 1, seen
        (peer,) = {peer for peer, _ in seen}
        assert all(reply["peer"] == list(peer) for reply in replies)

    run(loop, main())


def test_without_keep_alive_each_request_gets_a_new_connection(loop):
    # The counterpart of the test above: it shows the peername check can tell apart
    # one reused connection from several fresh ones.
    async def main():
        app, seen = connection_identity_app()
        trace, counts = connection_counting_trace()
        async with serving(app) as url:
            connector = aiohttp.TCPConnector(limit=1, force_close=True)
            async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
                for _ in range(3):
                    async with session.get(f"{url}/who") as resp:
                        assert resp.status == 200
                        assert (await resp.json())["keep_alive"] is False
        assert counts == {"created": 3, "reused": 0}
        assert len({peer for peer, _ in seen}) == 3, seen

    run(loop, main())


# --------------------------------------------------------------------------- chunked bodies


def test_chunked_request_body_arrives_byte_for_byte(loop):
    received = bytearray()
    chunk_sizes = []

    async def upload(request: web.Request) -> web.Response:
        assert request.headers.get("Transfer-Encoding") == "chunked"
        assert request.content_length is None
        async for chunk in request.content.iter_any():
            chunk_sizes.append(len(chunk))
            received.extend(chunk)
        return web.json_response({"size": len(received)})

    async def main():
        app = web.Application(client_max_size=STREAM_SIZE * 2)
        app.router.add_post("/upload", upload)
        async with serving(app) as url, aiohttp.ClientSession() as session:
            async with session.post(f"{url}/upload", data=pattern_chunks(STREAM_SIZE)) as resp:
                assert resp.status == 200
                assert await resp.json() == {"size": STREAM_SIZE}

    run(loop, main())
    assert len(chunk_sizes) > 1
    assert_bytes_equal(received, pattern(STREAM_SIZE))


def test_streamed_chunked_response_body_arrives_byte_for_byte(loop):
    async def download(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        response.content_type = "application/octet-stream"
        await response.prepare(request)
        offset = 0
        step = 100_003
        while offset < STREAM_SIZE:
            n = min(step, STREAM_SIZE - offset)
            await response.write(pattern(n, offset))
            offset += n
        await response.write_eof()
        return response

    async def main():
        app = web.Application()
        app.router.add_get("/download", download)
        async with serving(app) as url, aiohttp.ClientSession() as session:
            async with session.get(f"{url}/download") as resp:
                assert resp.status == 200
                assert resp.headers["Transfer-Encoding"] == "chunked"
                assert "Content-Length" not in resp.headers
                got = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    got.extend(chunk)
        return got

    got = run(loop, main())
    assert_bytes_equal(got, pattern(STREAM_SIZE))


# --------------------------------------------------------------------------- websocket


def test_websocket_echoes_a_thousand_text_and_binary_messages_in_order(loop):
    count = 1000
    server_close_codes = []

    async def ws_echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        server_close_codes.append(ws.close_code)
        return ws

    def message(i: int):
        if i % 2:
            # every 100th binary message needs a 64-bit frame length (> 65535 bytes)
            size = 70_000 + i if i % 100 == 1 else (i * 37) % 1000
            return pattern(size, i)
        return f"message {i}: " + "ü€" * (i % 50)

    expected = [message(i) for i in range(count)]

    async def main():
        app = web.Application()
        app.router.add_get("/ws", ws_echo)
        async with serving(app) as url, aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{url}/ws") as ws:

                async def send_all():
                    for item in expected:
                        if isinstance(item, str):
                            await ws.send_str(item)
                        else:
                            await ws.send_bytes(item)

                sender = asyncio.create_task(send_all())
                got = []
                for _ in range(count):
                    msg = await ws.receive()
                    assert msg.type in (WSMsgType.TEXT, WSMsgType.BINARY), msg
                    got.append(msg.data)
                await sender
                await ws.close()
                assert ws.close_code == aiohttp.WSCloseCode.OK
        return got

    got = run(loop, main())
    assert len(got) == count
    for i, (received, sent) in enumerate(zip(got, expected, strict=True)):
        assert type(received) is type(sent), i
        assert received == sent, i
    assert server_close_codes == [aiohttp.WSCloseCode.OK]


# --------------------------------------------------------------------------- TLS


def test_https_verifies_the_server_and_serves_json_and_a_large_body(loop, tls_contexts):
    server_context, client_context = tls_contexts
    big = pattern(2 * MiB + 7, 99)

    async def secure(request: web.Request) -> web.Response:
        ssl_object = request.transport.get_extra_info("ssl_object")
        return web.json_response(
            {"scheme": request.scheme, "secure": request.secure, "tls": ssl_object.version()}
        )

    async def blob(request: web.Request) -> web.Response:
        return web.Response(body=big, content_type="application/octet-stream")

    async def main():
        app = basic_app()
        app.router.add_get("/secure", secure)
        app.router.add_get("/blob", blob)
        async with serving(app, ssl_context=server_context) as url:
            connector = aiohttp.TCPConnector(ssl=client_context, limit=1)
            async with aiohttp.ClientSession(connector=connector) as session:
                async with session.get(f"{url}/secure") as resp:
                    assert resp.status == 200
                    info = await resp.json()
                assert info["scheme"] == "https"
                assert info["secure"] is True
                assert info["tls"].startswith("TLSv1.")
                async with session.post(f"{url}/json", json={"over": "tls"}) as resp:
                    assert (await resp.json())["received"] == {"over": "tls"}
                async with session.get(f"{url}/blob") as resp:
                    # (held until the body is read; a small body would release it at once)
                    peercert = resp.connection.transport.get_extra_info("peercert")
                    assert peercert["subject"] == ((("commonName", "localhost"),),)
                    got = await resp.read()
        assert_bytes_equal(got, big)

    run(loop, main())


def test_https_client_rejects_a_certificate_it_does_not_trust(loop, tls_contexts):
    server_context, _ = tls_contexts
    untrusting = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no CA loaded: trusts nothing

    async def main():
        async with serving(basic_app(), ssl_context=server_context) as url:
            connector = aiohttp.TCPConnector(ssl=untrusting)
            async with aiohttp.ClientSession(connector=connector) as session:
                with pytest.raises(aiohttp.ClientConnectorCertificateError) as info:
                    await session.get(f"{url}/hello/x")
        assert isinstance(info.value.certificate_error, ssl.SSLCertVerificationError)

    run(loop, main())


# --------------------------------------------------------------------------- failures


def test_client_timeout_fires_while_the_handler_is_stuck_and_the_session_recovers(loop):
    async def main():
        entered = asyncio.Event()
        release = asyncio.Event()

        async def stuck(request: web.Request) -> web.Response:
            entered.set()
            await release.wait()
            return web.Response(text="too late")

        app = basic_app()
        app.router.add_get("/stuck", stuck)
        async with serving(app) as url, aiohttp.ClientSession() as session:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await session.get(f"{url}/stuck", timeout=aiohttp.ClientTimeout(total=0.3))
            elapsed = time.monotonic() - started
            assert entered.is_set()
            assert 0.25 <= elapsed < 5, elapsed
            release.set()
            async with session.get(f"{url}/hello/again") as resp:
                assert resp.status == 200
                assert await resp.text() == "hello, again!"

    run(loop, main())


def test_handler_exception_becomes_a_500_and_is_logged_by_the_server(loop, caplog):
    class Boom(Exception):
        pass

    async def broken(request: web.Request) -> web.Response:
        raise Boom("handler failed")

    async def main():
        app = basic_app()
        app.router.add_get("/broken", broken)
        async with serving(app) as url, aiohttp.ClientSession() as session:
            async with session.get(f"{url}/broken") as resp:
                assert resp.status == 500
                assert "500 Internal Server Error" in await resp.text()
            with pytest.raises(aiohttp.ClientResponseError) as info:
                async with session.get(f"{url}/broken", raise_for_status=True):
                    pass
            assert info.value.status == 500
            async with session.get(f"{url}/hello/after") as resp:
                assert await resp.text() == "hello, after!"

    with caplog.at_level(logging.ERROR, logger="aiohttp.server"):
        run(loop, main())
    logged = [r for r in caplog.records if r.name == "aiohttp.server" and r.exc_info]
    assert len(logged) == 2
    assert all(r.exc_info[0] is Boom for r in logged)


# --------------------------------------------------------------------------- Unix socket


@pytest.fixture
def unix_path(tmp_path):
    path = os.path.join(tmp_path, "web.sock")
    if len(os.fsencode(path)) > 100:  # sun_path holds 108 bytes
        pytest.skip("temporary directory path too long for a Unix socket")
    return path


def test_unix_site_serves_requests_through_a_unix_connector(loop, unix_path):
    async def where(request: web.Request) -> web.Response:
        return web.json_response({"sockname": request.transport.get_extra_info("sockname")})

    async def main():
        app = basic_app()
        app.router.add_get("/where", where)
        async with serving(app, unix_path=unix_path) as url:
            connector = aiohttp.UnixConnector(path=unix_path)
            async with aiohttp.ClientSession(connector=connector) as session:
                async with session.get(f"{url}/where") as resp:
                    assert await resp.json() == {"sockname": unix_path}
                async with session.post(f"{url}/json", json=[1, "two"]) as resp:
                    assert (await resp.json())["received"] == [1, "two"]
                async with session.get(f"{url}/hello/unix") as resp:
                    assert await resp.text() == "hello, unix!"

    run(loop, main())


# --------------------------------------------------------------------------- raw streams


async def read_http_response(reader: asyncio.StreamReader) -> tuple[str, dict, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers["content-length"]))
    return status_line, headers, body


def test_open_connection_speaks_raw_http_1_1_with_keep_alive_then_close(loop):
    async def main():
        async with serving(basic_app()) as url:
            port = server_port(url)
            reader, writer = await asyncio.open_connection(HOST, port)
            try:
                writer.write(f"GET /hello/raw HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode())
                status, headers, body = await read_http_response(reader)
                assert status == "HTTP/1.1 200 OK"
                assert body == b"hello, raw!"
                assert headers.get("connection", "keep-alive").lower() == "keep-alive"

                payload = json.dumps({"raw": True}).encode()
                # Two pipelined requests in one write: answered in order on the same
                # connection, the last one closing it.
                writer.write(
                    b"POST /json HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                    + b"GET /hello/last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                await writer.drain()
                status, _, body = await read_http_response(reader)
                assert status == "HTTP/1.1 200 OK"
                assert json.loads(body)["received"] == {"raw": True}
                status, headers, body = await read_http_response(reader)
                assert status == "HTTP/1.1 200 OK"
                assert headers["connection"].lower() == "close"
                assert body == b"hello, last!"
                assert await reader.read() == b""  # the server closed the connection
            finally:
                writer.close()
                await writer.wait_closed()

    run(loop, main())

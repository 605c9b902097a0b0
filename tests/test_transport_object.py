"""The transport objects themselves: their class, lifetime and ownership of the fd.

ferroloop's transports are native classes deriving from asyncio's transport classes;
these tests pin what user code can observe about them, on both loops.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import subprocess
import sys
import time
import warnings
import weakref

import pytest


async def _socket_transport(loop, protocol_factory=asyncio.Protocol):
    a, b = socket.socketpair()
    transport, protocol = await loop.create_connection(protocol_factory, sock=a)
    return transport, protocol, b


def test_socket_transport_is_a_transport_subclass_instance(loop):
    async def main():
        transport, _, peer = await _socket_transport(loop)
        try:
            return type(transport), transport
        finally:
            transport.close()
            peer.close()
            await asyncio.sleep(0)

    cls, transport = loop.run_until_complete(main())
    assert isinstance(transport, asyncio.Transport)
    assert issubclass(cls, asyncio.Transport)
    assert issubclass(cls, asyncio.ReadTransport)
    assert issubclass(cls, asyncio.WriteTransport)


def test_a_transport_method_without_parameters_refuses_any_argument(loop):
    async def main():
        transport, _, peer = await _socket_transport(loop)
        try:
            with pytest.raises(TypeError):
                transport.is_closing(1)
            with pytest.raises(TypeError):
                transport.is_closing(closing=True)
            with pytest.raises(TypeError):
                transport.is_reading(None)
            with pytest.raises(TypeError):
                transport.get_write_buffer_size(0)
            return transport.is_closing()
        finally:
            transport.close()
            peer.close()
            await asyncio.sleep(0)

    assert loop.run_until_complete(main()) is False


def _specialized_method_loads(func) -> set[str]:
    """The specialized forms of the method loads in ``func`` (``dis``'s adaptive view)."""
    import dis

    return {
        ins.opname
        for ins in dis.get_instructions(func, adaptive=True)
        if ins.opname.startswith(("LOAD_METHOD", "LOAD_ATTR_METHOD"))
    }


@pytest.mark.ferroloop_only("how the interpreter treats ferroloop's native transport class")
@pytest.mark.skipif(sys.version_info < (3, 11), reason="adaptive interpreter from 3.11")
def test_a_transport_method_called_from_python_gets_a_specialized_lookup(loop):
    """The interpreter caches the lookup of ``transport.is_closing`` at the call site
    (3.11 specializes it only for an instance whose ``__dict__`` exists; without one,
    each call takes the generic lookup)."""

    def call_often(transport):
        for _ in range(100):
            transport.is_closing()

    async def main():
        transport, _, peer = await _socket_transport(loop)
        try:
            call_often(transport)
            return _specialized_method_loads(call_often)
        finally:
            transport.close()
            peer.close()
            await asyncio.sleep(0)

    loads = loop.run_until_complete(main())
    assert loads and not loads & {"LOAD_METHOD", "LOAD_METHOD_ADAPTIVE", "LOAD_ATTR"}, loads


def test_transport_accepts_weakrefs_and_attributes(loop):
    async def main():
        transport, _, peer = await _socket_transport(loop)
        ref = weakref.ref(transport)
        transport.user_tag = "mine"
        tag = transport.user_tag
        transport.close()
        peer.close()
        await asyncio.sleep(0)
        return ref, tag, transport

    ref, tag, transport = loop.run_until_complete(main())
    assert ref() is transport
    assert tag == "mine"


@pytest.mark.ferroloop_only("the stdlib's transport classes can be instantiated by hand")
def test_native_transport_class_cannot_be_instantiated_directly(loop):
    async def main():
        transport, _, peer = await _socket_transport(loop)
        transport.close()
        peer.close()
        await asyncio.sleep(0)
        return type(transport)

    cls = loop.run_until_complete(main())
    with pytest.raises(TypeError):
        cls()


def test_pipe_transports_are_read_and_write_transports(loop):
    async def main():
        r, w = os.pipe()
        rt, _ = await loop.connect_read_pipe(asyncio.Protocol, os.fdopen(r, "rb", 0))
        wt, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(w, "wb", 0))
        kinds = (isinstance(rt, asyncio.ReadTransport), isinstance(wt, asyncio.WriteTransport))
        rt.close()
        wt.close()
        await asyncio.sleep(0.01)
        return kinds

    assert loop.run_until_complete(main()) == (True, True)


def test_unreferenced_unclosed_transport_warns_and_closes_its_socket(loop):
    async def main():
        transport, _, peer = await _socket_transport(loop)
        transport.pause_reading()  # nothing in the loop refers to it any more
        await asyncio.sleep(0)
        fd = transport.get_extra_info("socket").fileno()
        return weakref.ref(transport), fd, peer

    with warnings.catch_warnings(record=True) as caught:
        # The socket object may be finalized first when the transport dies in a cycle;
        # then it warns too. Ours is the one asserted.
        warnings.simplefilter("always")
        ref, fd, peer = loop.run_until_complete(main())
        gc.collect()
    messages = [str(w.message) for w in caught]
    del caught  # a warning keeps its source alive
    gc.collect()
    try:
        assert any("unclosed transport" in m for m in messages), messages
        assert ref() is None
        with pytest.raises(OSError):
            os.fstat(fd)
    finally:
        peer.close()


def test_closed_protocol_transport_cycle_is_collected(loop):
    class Holder(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

    async def main():
        transport, protocol, peer = await _socket_transport(loop, Holder)
        transport.close()
        peer.close()
        await asyncio.sleep(0.01)
        return weakref.ref(transport), weakref.ref(protocol)

    refs = loop.run_until_complete(main())
    gc.collect()
    assert [r() for r in refs] == [None, None]


def test_raw_io_on_a_transport_socket_is_refused(loop):
    async def main():
        transport, _, peer = await _socket_transport(loop)
        sock = transport.get_extra_info("socket")
        errors = []
        for call in (
            lambda: loop.add_reader(sock.fileno(), print),
            lambda: loop.remove_writer(sock.fileno()),
        ):
            with pytest.raises(RuntimeError, match="is used by transport") as info:
                call()
            errors.append(info.value)
        transport.close()
        peer.close()
        await asyncio.sleep(0)
        # Once the transport is closing, the fd is free for raw use again.
        return errors

    assert len(loop.run_until_complete(main())) == 2


def test_closing_a_transport_after_its_loop_closed_raises(loop_factory):
    loop = loop_factory()

    async def main():
        transport, _, peer = await _socket_transport(loop)
        return transport, peer

    transport, peer = loop.run_until_complete(main())
    loop.close()
    try:
        with pytest.raises(RuntimeError, match="Event loop is closed"):
            transport.close()
    finally:
        peer.close()
        transport.get_extra_info("socket")  # still answers
        with pytest.warns(ResourceWarning):
            del transport
            gc.collect()


def test_slow_protocol_callback_in_debug_mode_is_logged_not_fatal(loop, caplog):
    class Slow(asyncio.Protocol):
        def __init__(self):
            self.got = loop.create_future()

        def data_received(self, data):
            time.sleep(0.06)
            self.got.set_result(data)

    async def main():
        transport, protocol, peer = await _socket_transport(loop, Slow)
        peer.send(b"x")
        data = await protocol.got
        transport.close()
        peer.close()
        await asyncio.sleep(0)
        return data

    loop.set_debug(True)
    loop.slow_callback_duration = 0.05
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        assert loop.run_until_complete(main()) == b"x"
    assert any("took" in r.getMessage() for r in caplog.records)


_CYCLE_AT_EXIT = """
import asyncio, os, socket, ssl, sys

class Holder:
    pass

def leak(obj):
    # A garbage cycle holding the object: collected only while the interpreter exits.
    holder = Holder()
    holder.me = holder
    holder.obj = obj

loop = new_loop()
kind = sys.argv[1]

async def main():
    if kind == "socket":
        a, b = socket.socketpair()
        transport, _ = await loop.create_connection(asyncio.Protocol, sock=a)
        b.close()
    elif kind == "datagram":
        transport, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
        )
    elif kind == "pipe":
        r, w = os.pipe()
        transport, _ = await loop.connect_read_pipe(asyncio.Protocol, os.fdopen(r, "rb"))
        os.close(w)
    elif kind == "tls":
        cert, key = sys.argv[2], sys.argv[3]
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(cert, key)
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_ctx.load_verify_locations(cert)
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await loop.create_connection(
            asyncio.Protocol, "127.0.0.1", port, ssl=client_ctx
        )
        server.close()
    transport.close()
    await asyncio.sleep(0.05)
    leak(transport)

loop.run_until_complete(main())
loop.close()
print("exiting", flush=True)
"""


@pytest.mark.parametrize("kind", ["socket", "datagram", "pipe", "tls"])
def test_transport_in_a_garbage_cycle_at_exit_does_not_crash_the_interpreter(
    loop_factory_code, kind, tls_files
):
    # The collector frees such a cycle during interpreter finalization, when
    # Py_IsInitialized() is already 0: deallocating the transport must not assume more.
    cert, key = tls_files
    done = subprocess.run(
        [sys.executable, "-c", loop_factory_code + _CYCLE_AT_EXIT, kind, str(cert), str(key)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout == "exiting\n"
    assert "panicked" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr

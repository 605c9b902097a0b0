"""redis-py's asyncio client against a real Redis server, on the stdlib loop and ferroloop.

redis-py talks to the server through ``asyncio.open_connection`` streams (TCP or Unix),
so these tests exercise the stream reader/writer pair under pipelining, long-lived pub/sub
reads and blocking commands abandoned by a timeout (a cancelled ``readline`` in flight).
Keys are prefixed per test and loop; the server is shared (``redis_service`` fixture).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import pytest
import redis.asyncio as redis  # a test dependency (pyproject.toml)
from netutil import run

_prefixes = itertools.count()


def key_prefix(loop) -> str:
    return f"{type(loop).__name__}:{next(_prefixes)}:"


@contextlib.asynccontextmanager
async def client(service, **kwargs):
    conn = redis.Redis(host=service.host, port=service.port, **kwargs)
    try:
        yield conn
    finally:
        await conn.aclose()


def test_commands_round_trip_over_tcp_and_a_unix_socket(loop, redis_service):
    async def main():
        k = key_prefix(loop)
        async with client(redis_service, decode_responses=True) as tcp:
            unix = redis.Redis(unix_socket_path=redis_service.unix_path, decode_responses=True)
            try:
                assert await tcp.ping() is True
                await tcp.set(k + "greeting", "hello")
                assert await unix.get(k + "greeting") == "hello"
                assert await unix.incrby(k + "n", 41) == 41
                assert await tcp.incr(k + "n") == 42
                big = "y" * (3 * 1024 * 1024 + 7)
                await unix.set(k + "big", big)
                assert await tcp.get(k + "big") == big
                await tcp.hset(k + "h", mapping={"a": "1", "b": "2"})
                assert await unix.hgetall(k + "h") == {"a": "1", "b": "2"}
                with pytest.raises(redis.ResponseError):
                    await tcp.lpush(k + "greeting", "not a list")  # WRONGTYPE
                assert await tcp.get(k + "greeting") == "hello"  # still usable
            finally:
                await unix.aclose()

    run(loop, main(), 30)


def test_pipelines_send_ten_thousand_commands_and_transactions_are_atomic(loop, redis_service):
    async def main():
        k = key_prefix(loop)
        async with client(redis_service) as conn:
            async with conn.pipeline(transaction=False) as pipe:
                for i in range(10_000):
                    pipe.set(f"{k}{i}", i)
                for i in range(10_000):
                    pipe.get(f"{k}{i}")
                replies = await pipe.execute()
            assert replies[:10_000] == [True] * 10_000
            assert replies[10_000:] == [str(i).encode() for i in range(10_000)]

            async with conn.pipeline(transaction=True) as pipe:
                pipe.incr(k + "counter").incr(k + "counter").get(k + "counter")
                assert await pipe.execute() == [1, 2, b"2"]

            # WATCH: a concurrent change to a watched key aborts the transaction.
            async with client(redis_service) as other:
                async with conn.pipeline(transaction=True) as pipe:
                    await pipe.watch(k + "counter")
                    await other.set(k + "counter", 100)
                    pipe.multi()
                    pipe.incr(k + "counter")
                    with pytest.raises(redis.WatchError):
                        await pipe.execute()
            assert await conn.get(k + "counter") == b"100"

    run(loop, main(), 60)


def test_many_concurrent_clients_share_a_bounded_connection_pool(loop, redis_service):
    async def main():
        k = key_prefix(loop)
        pool = redis.BlockingConnectionPool(
            host=redis_service.host, port=redis_service.port, max_connections=10, timeout=20
        )
        conn = redis.Redis(connection_pool=pool)
        try:

            async def bump(n: int) -> None:
                for _ in range(n):
                    await conn.incr(k + "hits")

            await asyncio.gather(*(bump(50) for _ in range(200)))
            assert await conn.get(k + "hits") == b"10000"
            clients = await conn.client_list()
            ours = [c for c in clients if c.get("cmd") != "client|list"]
            assert len(pool._in_use_connections) + len(pool._available_connections) <= 10
            assert len(ours) <= 10
        finally:
            await conn.aclose()
            await pool.aclose()

    run(loop, main(), 60)


def test_pubsub_delivers_channel_and_pattern_messages_in_order(loop, redis_service):
    async def main():
        k = key_prefix(loop)
        async with client(redis_service) as sub_conn, client(redis_service) as pub_conn:
            pubsub = sub_conn.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(k + "news")
                await pubsub.psubscribe(k + "logs.*")
                received: list[tuple[bytes, bytes]] = []

                async def reader() -> None:
                    while len(received) < 2000:
                        message = await pubsub.get_message(timeout=5)
                        if message is None:
                            continue
                        received.append((message["channel"], message["data"]))

                task = asyncio.ensure_future(reader())
                for i in range(1000):
                    assert await pub_conn.publish(k + "news", f"n{i}") == 1
                    assert await pub_conn.publish(k + f"logs.{i % 3}", f"l{i}") == 1
                await asyncio.wait_for(task, 20)
                news = [d for c, d in received if c == (k + "news").encode()]
                logs = [d for c, d in received if c != (k + "news").encode()]
                assert news == [f"n{i}".encode() for i in range(1000)]
                assert logs == [f"l{i}".encode() for i in range(1000)]
                await pubsub.unsubscribe()
                await pubsub.punsubscribe()
            finally:
                await pubsub.aclose()

    run(loop, main(), 60)


def test_blocking_pop_abandoned_by_a_timeout_leaves_the_client_usable(loop, redis_service):
    async def main():
        k = key_prefix(loop)
        async with client(redis_service) as conn, client(redis_service) as pusher:
            # The server-side timeout: BLPOP returns None after 0.2 s.
            started = loop.time()
            assert await conn.blpop([k + "empty"], timeout=0.2) is None
            assert 0.15 <= loop.time() - started < 5

            # A client-side timeout cancels a BLPOP that would block forever; redis-py then
            # drops that connection (its reply would arrive later) and the client goes on.
            for _ in range(3):
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(conn.blpop([k + "empty"], timeout=0), 0.2)
                assert await conn.ping() is True
            await conn.rpush(k + "later", "a")
            assert await conn.lpop(k + "later") == b"a"

            # A blocked pop is woken by a push from another client.
            waiting = asyncio.ensure_future(conn.blpop([k + "q"], timeout=10))
            await asyncio.sleep(0.1)
            assert not waiting.done()
            await pusher.rpush(k + "q", "wake")
            assert await asyncio.wait_for(waiting, 5) == ((k + "q").encode(), b"wake")
            # Nothing was popped by the abandoned BLPOPs: the list gets only what we push.
            await pusher.rpush(k + "empty", "x")
            assert await conn.lrange(k + "empty", 0, -1) == [b"x"]

    run(loop, main(), 30)

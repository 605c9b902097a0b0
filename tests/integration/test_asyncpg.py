"""asyncpg against a real PostgreSQL server, on the stdlib loop and on ferroloop.

The server is a private instance (``postgres`` fixture, conftest.py); each test uses its
own table names, so the two loops' runs of a test cannot see each other's rows.  asyncpg
drives the loop hard in ways plain echo tests do not: its protocol is a Cython
``asyncio.Protocol`` on a TCP (or Unix) transport with flow control, cancellation sends a
cancel request over a second connection, and COPY streams through ``transport.write``
with ``pause_writing``/``resume_writing``.
"""

from __future__ import annotations

import asyncio
import io
import itertools

import asyncpg  # a test dependency (pyproject.toml): missing, the module fails to import
import pytest
from netutil import run

_names = itertools.count()


def table_name(loop) -> str:
    """A table name unique to this test run and loop."""
    return f"t_{type(loop).__name__.lower()}_{next(_names)}"


async def connect(postgres, **kwargs) -> asyncpg.Connection:
    return await asyncpg.connect(postgres.dsn, **kwargs)


def test_connects_over_tcp_and_unix_socket_and_reads_server_settings(loop, postgres):
    async def main():
        tcp = await connect(postgres)
        unix = await asyncpg.connect(
            host=postgres.socket_dir, port=postgres.port, user=postgres.user, database="postgres"
        )
        try:
            for conn in (tcp, unix):
                assert await conn.fetchval("SELECT 1 + 1") == 2
                assert conn.get_server_version().major >= 12
                assert await conn.fetchval("SHOW server_encoding") == "UTF8"
            assert await tcp.fetchval("SELECT inet_client_addr()") is not None
            assert await unix.fetchval("SELECT inet_client_addr()") is None  # a Unix socket
        finally:
            await tcp.close()
            await unix.close()
        assert tcp.is_closed() and unix.is_closed()

    run(loop, main(), 30)


def test_pool_of_ten_serves_ten_thousand_concurrent_queries(loop, postgres):
    async def main():
        async with asyncpg.create_pool(postgres.dsn, min_size=10, max_size=10) as pool:
            backends: set[int] = set()
            query = "SELECT $1::int * 3 AS v, pg_backend_pid() AS p"

            async def worker(start: int) -> int:
                total = 0
                for i in range(start, start + 500):
                    async with pool.acquire() as conn:
                        row = await conn.fetchrow(query, i)
                        assert row["v"] == i * 3
                        backends.add(row["p"])
                        total += row["v"]
                return total

            totals = await asyncio.gather(*(worker(k * 500) for k in range(20)))
            assert sum(totals) == 3 * sum(range(10_000))
            # Every query went through the pool's ten connections, and all ten were used.
            assert len(backends) == 10
            assert pool.get_size() == 10

    run(loop, main(), 120)


def test_prepared_statement_is_reused_and_reports_its_types(loop, postgres):
    async def main():
        conn = await connect(postgres)
        try:
            stmt = await conn.prepare("SELECT $1::int + $2::int AS s, $3::text || '!' AS t")
            assert [p.name for p in stmt.get_parameters()] == ["int4", "int4", "text"]
            assert [a.name for a in stmt.get_attributes()] == ["s", "t"]
            for i in range(1000):
                assert await stmt.fetchrow(i, 1, f"x{i}") == (i + 1, f"x{i}!")
            rows = await conn.fetch("SELECT g FROM generate_series(1, 50000) g")
            assert [r["g"] for r in rows] == list(range(1, 50001))
            async with conn.transaction():
                cursor = conn.cursor("SELECT g FROM generate_series(1, 20000) g", prefetch=333)
                seen = [r["g"] async for r in cursor]
            assert seen == list(range(1, 20001))
        finally:
            await conn.close()

    run(loop, main(), 60)


def test_transaction_rolled_back_by_an_exception_leaves_no_rows(loop, postgres):
    async def main():
        conn = await connect(postgres)
        name = table_name(loop)
        try:
            await conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v text)")
            await conn.execute(f"INSERT INTO {name} VALUES (1, 'kept')")
            with pytest.raises(ZeroDivisionError):
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {name} VALUES (2, 'rolled back')")
                    await conn.execute(f"UPDATE {name} SET v = 'changed' WHERE id = 1")
                    assert await conn.fetchval(f"SELECT count(*) FROM {name}") == 2
                    1 / 0  # noqa: B018
            assert await conn.fetch(f"SELECT id, v FROM {name}") == [(1, "kept")]
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {name} VALUES (3, 'committed')")
                savepoint = conn.transaction()  # nested: a savepoint
                await savepoint.start()
                await conn.execute(f"INSERT INTO {name} VALUES (4, 'savepoint')")
                await savepoint.rollback()
            assert await conn.fetchval(f"SELECT array_agg(id ORDER BY id) FROM {name}") == [1, 3]
        finally:
            await conn.execute(f"DROP TABLE IF EXISTS {name}")
            await conn.close()

    run(loop, main(), 30)


def test_copy_in_and_out_moves_every_row_through_the_transport(loop, postgres):
    async def main():
        conn = await connect(postgres)
        name = table_name(loop)
        try:
            await conn.execute(f"CREATE TABLE {name} (id int, payload text)")
            records = [(i, f"row {i} " + "x" * (i % 300)) for i in range(50_000)]
            result = await conn.copy_records_to_table(name, records=records)
            assert result == "COPY 50000"
            # COPY ... TO STDOUT into a file-like object: the whole table as CSV.
            out = io.BytesIO()
            query = f"SELECT * FROM {name} ORDER BY id"
            await conn.copy_from_query(query, output=out, format="csv")
            lines = out.getvalue().decode().splitlines()
            assert len(lines) == 50_000
            assert lines[12_345] == "12345,row 12345 " + "x" * (12_345 % 300)
            # ... and back in with COPY FROM STDIN from a file-like source.
            await conn.execute(f"TRUNCATE {name}")
            await conn.copy_to_table(name, source=io.BytesIO(out.getvalue()), format="csv")
            back = await conn.fetch(f"SELECT id, payload FROM {name} ORDER BY id")
            assert [tuple(r) for r in back] == records
        finally:
            await conn.execute(f"DROP TABLE IF EXISTS {name}")
            await conn.close()

    run(loop, main(), 60)


def test_server_side_errors_raise_typed_exceptions_and_the_connection_stays_usable(loop, postgres):
    async def main():
        conn = await connect(postgres)
        name = table_name(loop)
        try:
            with pytest.raises(asyncpg.UndefinedTableError):
                await conn.fetch("SELECT * FROM no_such_table_anywhere")
            with pytest.raises(asyncpg.DivisionByZeroError):
                await conn.fetchval("SELECT 1 / 0")
            await conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY)")
            await conn.execute(f"INSERT INTO {name} VALUES (1)")
            with pytest.raises(asyncpg.UniqueViolationError) as info:
                await conn.execute(f"INSERT INTO {name} VALUES (1)")
            assert info.value.constraint_name == f"{name}_pkey"
            with pytest.raises(asyncpg.PostgresSyntaxError):
                await conn.execute("SELEC 1")
            assert await conn.fetchval("SELECT 42") == 42
        finally:
            await conn.execute(f"DROP TABLE IF EXISTS {name}")
            await conn.close()

    run(loop, main(), 30)


def test_cancelled_query_is_cancelled_on_the_server_and_the_connection_recovers(loop, postgres):
    async def main():
        conn = await connect(postgres)
        try:
            started = loop.time()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(conn.execute("SELECT pg_sleep(30)"), 0.3)
            # asyncpg sent a CancelRequest over a second connection; the server stopped the
            # sleep, so the connection answers again right away.
            assert await conn.fetchval("SELECT 'alive'") == "alive"
            assert loop.time() - started < 10
            with pytest.raises(asyncpg.QueryCanceledError):
                await conn.execute("SET statement_timeout = 100; SELECT pg_sleep(30)")
            await conn.execute("SET statement_timeout = 0")
            assert await conn.fetchval("SELECT 7") == 7
        finally:
            await conn.close()

    run(loop, main(), 30)


def test_listen_notify_delivers_notifications_in_order(loop, postgres):
    async def main():
        listener = await connect(postgres)
        sender = await connect(postgres)
        got: list[str] = []
        done = loop.create_future()

        def on_notify(connection, pid, channel, payload):
            got.append(payload)
            if len(got) == 100 and not done.done():
                done.set_result(None)

        try:
            await listener.add_listener("ferroloop_events", on_notify)
            for i in range(100):
                await sender.execute("SELECT pg_notify('ferroloop_events', $1)", str(i))
            await asyncio.wait_for(done, 10)
            assert got == [str(i) for i in range(100)]
            await listener.remove_listener("ferroloop_events", on_notify)
        finally:
            await listener.close()
            await sender.close()

    run(loop, main(), 30)


def test_terminated_backend_fails_the_pending_query_with_a_connection_error(loop, postgres):
    async def main():
        victim = await connect(postgres)
        killer = await connect(postgres)
        try:
            pid = victim.get_server_pid()
            query = asyncio.ensure_future(victim.fetchval("SELECT pg_sleep(30)"))
            await asyncio.sleep(0.2)
            assert await killer.fetchval("SELECT pg_terminate_backend($1)", pid) is True
            with pytest.raises((asyncpg.AdminShutdownError, asyncpg.ConnectionDoesNotExistError)):
                await asyncio.wait_for(query, 10)
            assert victim.is_closed()
        finally:
            victim.terminate()
            await killer.close()

    run(loop, main(), 30)

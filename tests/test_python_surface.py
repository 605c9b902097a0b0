"""The ferroloop package's public surface (ferroloop-only by nature)."""

import asyncio
import json
import subprocess
import sys
import textwrap

import pytest

# Each test takes well under a second; a hung loop should fail fast, not after 120 s.
pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def restore_policy():
    old = asyncio.get_event_loop_policy()
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(old)
        asyncio.set_event_loop(None)


def test_new_event_loop_returns_an_abstract_event_loop(ferroloop_module):
    loop = ferroloop_module.new_event_loop()
    try:
        assert isinstance(loop, asyncio.AbstractEventLoop)
        assert isinstance(loop, ferroloop_module.Loop)
        assert issubclass(ferroloop_module.Loop, asyncio.AbstractEventLoop)
    finally:
        loop.close()


def test_each_new_event_loop_call_returns_a_fresh_loop(ferroloop_module):
    a = ferroloop_module.new_event_loop()
    b = ferroloop_module.new_event_loop()
    try:
        assert a is not b
        a.close()
        assert a.is_closed() and not b.is_closed()
    finally:
        a.close()
        b.close()


def test_event_loop_policy_makes_new_event_loop_return_ferroloop(ferroloop_module, restore_policy):
    asyncio.set_event_loop_policy(ferroloop_module.EventLoopPolicy())
    loop = asyncio.new_event_loop()
    try:
        assert isinstance(loop, ferroloop_module.Loop)
    finally:
        loop.close()


def test_install_makes_new_event_loop_and_run_use_ferroloop(ferroloop_module, restore_policy):
    assert ferroloop_module.install() is None
    assert isinstance(asyncio.get_event_loop_policy(), ferroloop_module.EventLoopPolicy)
    loop = asyncio.new_event_loop()
    try:
        assert isinstance(loop, ferroloop_module.Loop)
    finally:
        loop.close()

    async def main():
        return type(asyncio.get_running_loop())

    assert asyncio.run(main()) is ferroloop_module.Loop


def test_restoring_the_policy_gives_back_stdlib_loops(ferroloop_module, restore_policy):
    old = asyncio.get_event_loop_policy()
    ferroloop_module.install()
    asyncio.set_event_loop_policy(old)
    loop = asyncio.new_event_loop()
    try:
        assert not isinstance(loop, ferroloop_module.Loop)
    finally:
        loop.close()


def test_run_runs_coroutine_on_a_ferroloop_loop_and_returns_result(ferroloop_module):
    async def main(x):
        await asyncio.sleep(0.001)
        loop = asyncio.get_running_loop()
        return x * 2, loop, loop.get_debug()

    result, loop, debug = ferroloop_module.run(main(21))
    assert result == 42
    assert isinstance(loop, ferroloop_module.Loop)
    assert loop.is_closed()
    assert debug is False


def test_run_debug_true_enables_debug_mode(ferroloop_module):
    async def main():
        return asyncio.get_running_loop().get_debug()

    assert ferroloop_module.run(main(), debug=True) is True


def test_run_propagates_exceptions(ferroloop_module):
    async def main():
        raise ArithmeticError("from ferroloop.run")

    with pytest.raises(ArithmeticError, match="from ferroloop.run"):
        ferroloop_module.run(main())


# --------------------------------------------------------------------------- python -m ferroloop


def run_script(tmp_path, source, *args, via_ferroloop=True):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    prefix = [sys.executable, "-m", "ferroloop"] if via_ferroloop else [sys.executable]
    return subprocess.run(
        [*prefix, "script.py", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


INTROSPECT = """
    import json, os, sys
    print(json.dumps({
        "name": __name__,
        "argv": sys.argv,
        "path0": os.path.realpath(sys.path[0]),
        "file": os.path.basename(__file__),
    }))
"""


def test_python_m_ferroloop_runs_script_as_main_with_argv_like_python(ferroloop_module, tmp_path):
    via_ferro = run_script(tmp_path, INTROSPECT, "a", "b")
    plain = run_script(tmp_path, INTROSPECT, "a", "b", via_ferroloop=False)
    assert via_ferro.returncode == 0, via_ferro.stderr
    assert plain.returncode == 0, plain.stderr
    got, expected = json.loads(via_ferro.stdout), json.loads(plain.stdout)
    assert got["name"] == "__main__"
    assert got["argv"] == ["script.py", "a", "b"]
    assert got == expected


def test_python_m_ferroloop_script_can_import_sibling_modules(ferroloop_module, tmp_path):
    (tmp_path / "sibling_mod_for_test.py").write_text("VALUE = 'sibling'\n")
    result = run_script(
        tmp_path, "import sibling_mod_for_test\nprint(sibling_mod_for_test.VALUE)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "sibling"


def test_python_m_ferroloop_propagates_exit_code(ferroloop_module, tmp_path):
    result = run_script(tmp_path, "import sys\nprint('before exit')\nsys.exit(3)\n")
    assert result.returncode == 3, result.stderr
    assert result.stdout.strip() == "before exit"


def test_python_m_ferroloop_prints_traceback_of_uncaught_exception(ferroloop_module, tmp_path):
    source = """
        def inner():
            raise ValueError("kaboom from script")

        inner()
    """
    via_ferro = run_script(tmp_path, source)
    plain = run_script(tmp_path, source, via_ferroloop=False)
    assert plain.returncode == 1
    assert via_ferro.returncode == plain.returncode
    err = via_ferro.stderr
    assert "Traceback (most recent call last):" in err
    assert "script.py" in err
    assert ", line 3, in inner" in err
    assert 'raise ValueError("kaboom from script")' in err
    assert err.strip().splitlines()[-1] == plain.stderr.strip().splitlines()[-1]
    assert err.strip().splitlines()[-1] == "ValueError: kaboom from script"


def test_python_m_ferroloop_script_run_uses_a_ferroloop_loop(ferroloop_module, tmp_path):
    source = """
        import asyncio
        import ferroloop

        async def main():
            loop = asyncio.get_running_loop()
            await asyncio.sleep(0.001)
            return isinstance(loop, ferroloop.Loop), type(loop).__name__

        print(asyncio.run(main()))
    """
    result = run_script(tmp_path, source)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(True, 'Loop')"

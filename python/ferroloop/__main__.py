"""``python -m ferroloop script.py [args...]``: run an unmodified asyncio script on ferroloop.

The script runs as ``__main__`` with ``sys.argv`` and ``sys.path[0]`` as plain ``python
script.py`` would set them; its exit code and its uncaught exceptions reach the shell the
same way.
"""

from __future__ import annotations

import os
import runpy
import sys

from . import install

_USAGE = "usage: python -m ferroloop script.py [args...]"


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(_USAGE, file=sys.stderr if len(sys.argv) < 2 else sys.stdout)
        sys.exit(2 if len(sys.argv) < 2 else 0)
    script = sys.argv[1]
    if not os.path.exists(script):
        print(f"ferroloop: can't open file {script!r}", file=sys.stderr)
        sys.exit(2)
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    install()
    try:
        runpy.run_path(script, run_name="__main__")
    except Exception as exc:
        # Report as `python script.py` would: without this module's and runpy's frames.
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != os.path.abspath(script):
            tb = tb.tb_next
        sys.excepthook(type(exc), exc, tb or exc.__traceback__)
        sys.exit(1)


if __name__ == "__main__":
    main()

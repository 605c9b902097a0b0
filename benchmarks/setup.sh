#!/usr/bin/env bash
# Create benchmarks/.venv (git-ignored) with the event loops benchmarks/run.py compares:
# uvloop, rloop and rsloop from PyPI, and ferroloop built (release) from this checkout.
#
#   benchmarks/setup.sh                   # everything (run.py calls this if the venv is missing)
#   benchmarks/setup.sh --ferroloop-only  # just reinstall ferroloop (run.py does this when stale)
#
# PYTHON picks the interpreter the venv is made from (default python3). Peers already installed
# are kept as they are; `benchmarks/.venv/bin/python -m pip install -U uvloop rloop` refreshes.
#
# rsloop ships only an sdist whose rust-toolchain.toml wants a nightly; it is built with the
# stable toolchain in nightly-feature mode. If that fails, the log is kept in
# benchmarks/.venv/rsloop-install.failed, setup goes on, and run.py marks rsloop unavailable.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
venv="$here/.venv"
python="${PYTHON:-python3}"

only_ferroloop=0
case "${1:-}" in
"") ;;
--ferroloop-only) only_ferroloop=1 ;;
*)
    echo "usage: $0 [--ferroloop-only]" >&2
    exit 2
    ;;
esac

if [ ! -x "$venv/bin/python" ]; then
    echo "setup.sh: creating $venv with $("$python" --version 2>&1) ($python)"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
fi
pip=("$venv/bin/python" -m pip)

if [ "$only_ferroloop" = 0 ]; then
    echo "setup.sh: installing uvloop, rloop"
    "${pip[@]}" install -q uvloop rloop

    echo "setup.sh: installing rsloop (builds from source, a few minutes)"
    rm -f "$venv/rsloop-install.failed"
    if RUSTUP_TOOLCHAIN=stable RUSTC_BOOTSTRAP=1 RUSTFLAGS="-Zcrate-attr=feature(allocator_api)" \
        "${pip[@]}" install rsloop >"$venv/rsloop-install.log" 2>&1; then
        echo "setup.sh: rsloop installed"
    else
        cp "$venv/rsloop-install.log" "$venv/rsloop-install.failed"
        echo "setup.sh: rsloop failed to build; run.py will mark it unavailable." >&2
        echo "          last lines of $venv/rsloop-install.failed:" >&2
        tail -n 15 "$venv/rsloop-install.failed" >&2
    fi
fi

echo "setup.sh: installing ferroloop from $root (release build)"
"${pip[@]}" install -q --no-deps --force-reinstall "$root"

"$venv/bin/python" - <<'EOF'
import importlib.metadata as md
for name in ("uvloop", "rloop", "rsloop", "ferroloop"):
    try:
        print(f"setup.sh: {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"setup.sh: {name} not installed")
EOF

#!/usr/bin/env bash
# Create benchmarks/.venv (git-ignored) with the event loops benchmarks/run.py compares:
# uvloop, rloop and rsloop from PyPI, and ferroloop built (release) from this checkout; plus
# httptools (the HTTP server of the http_* workloads) and matplotlib (run.py --write-results
# draws benchmarks/results.png), and wrk (the HTTP load generator) with apt-get if it is missing.
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
# If wrk cannot be installed (no apt-get, not root and no passwordless sudo), setup goes on
# and the http_* workloads become error cells saying so.
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

# wrk from the distribution (Debian/Ubuntu: apt-get install wrk), as root or with sudo -n.
install_wrk() {
    local sudo=()
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null && sudo -n true 2>/dev/null || return 1
        sudo=(sudo -n)
    fi
    command -v apt-get >/dev/null || return 1
    "${sudo[@]}" apt-get install -y -qq wrk >/dev/null 2>&1 && return 0
    "${sudo[@]}" apt-get update -qq >/dev/null 2>&1 && "${sudo[@]}" apt-get install -y -qq wrk >/dev/null 2>&1
}

if [ "$only_ferroloop" = 0 ]; then
    echo "setup.sh: installing uvloop, rloop, httptools, matplotlib"
    "${pip[@]}" install -q uvloop rloop httptools matplotlib

    if ! command -v wrk >/dev/null; then
        echo "setup.sh: installing wrk (apt-get install wrk)"
        if install_wrk && command -v wrk >/dev/null; then
            echo "setup.sh: $(wrk -v 2>&1 | head -n 1 | sed 's/ Copyright.*//')"
        else
            echo "setup.sh: could not install wrk (needs apt-get and root or sudo -n); the" \
                "http_* workloads will be error cells until it is on PATH" >&2
        fi
    fi

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
for name in ("uvloop", "rloop", "rsloop", "ferroloop", "httptools", "matplotlib"):
    try:
        print(f"setup.sh: {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"setup.sh: {name} not installed")
EOF

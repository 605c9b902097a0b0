#!/usr/bin/env bash
# Install the real servers the integration tests talk to: PostgreSQL and Redis, from the
# distribution's packages (Debian: postgresql, redis-server).  Nothing is started here and
# no system service is enabled: tests/integration/services.py runs a private instance of
# each on a free loopback port in a temporary directory for the length of a test session.
#
#   tests/integration/install-services.sh          # what `make test` runs
#
# Without apt-get, or without root / passwordless sudo, it says what is missing and exits
# 0: the tests that need a missing server are then skipped with that reason -- except
# under `make test` (FERROLOOP_REQUIRE_SERVICES=1), where they fail instead.
set -euo pipefail

have_postgres() {
    command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}
have_redis() { command -v redis-server >/dev/null 2>&1; }

missing=()
have_postgres || missing+=(postgresql)
have_redis || missing+=(redis-server)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

sudo=()
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        echo "install-services.sh: not root and no passwordless sudo; missing: ${missing[*]}" >&2
        exit 0
    fi
fi
if ! command -v apt-get >/dev/null; then
    echo "install-services.sh: no apt-get; install these by hand: ${missing[*]}" >&2
    exit 0
fi

echo "install-services.sh: apt-get install ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# The packages' maintainer scripts would start system-wide services; nothing here needs
# them (and a container has no init to run them), so policy-rc.d refuses every start.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
    "${sudo[@]}" chmod +x "$policy"
    made_policy=1
fi
install() { "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
if ! install; then
    "${sudo[@]}" apt-get update -qq >/dev/null
    install
fi
if [ "$made_policy" = 1 ]; then
    "${sudo[@]}" rm -f "$policy"
fi

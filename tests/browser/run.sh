#!/bin/sh
# The browser end-to-end test (e2e.mjs): builds the gateway and installs playwright-core when
# missing, then runs the test inside a fresh network namespace whose only interface is
# loopback, so that WebRTC cannot send anywhere else. Needs root (or user namespaces),
# /usr/bin/chromium and turnserver (Debian: apt-get install chromium coturn).
#
# MATCHGATE_BIN picks the gateway binary (default target/debug/matchgate, built when missing);
# screenshots and logs go to target/browser-artifacts/ (ARTIFACTS_DIR).
set -eu
cd "$(dirname "$0")/../.."

if [ -z "${MATCHGATE_BIN:-}" ]; then
    cargo build --quiet --bin matchgate
    MATCHGATE_BIN=target/debug/matchgate
fi
export MATCHGATE_BIN
if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)'; then
    echo "tests/browser: playwright-core needs Node 20 or later (found $(node --version))" >&2
    exit 1
fi
if [ ! -d tests/browser/node_modules/playwright-core ]; then
    # playwright-core never downloads a browser; the test uses the system's Chromium.
    (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi
exec unshare -n sh -c 'ip link set lo up && exec node tests/browser/e2e.mjs'

#!/usr/bin/env bash
# Installs the official LiveKit Node server SDK (livekit-server-sdk) into a fresh temporary
# folder for the interop tests (tests/interop/livekit-sdk.mjs, run with LIVEKIT_SDK_DIR set to
# that folder) and prints the folder's path on stdout. Everything else goes to stderr.
# Without node or npm it prints a visible SKIPPED line on stderr, nothing on stdout, and exits 0.
# A failed install exits non-zero.
set -euo pipefail

for tool in node npm; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "SKIPPED: LiveKit SDK interop: $tool not found, the LiveKit SDK interop tests will NOT run" >&2
    exit 0
  fi
done

# A 2.19.x release; bump deliberately.
VERSION="${LIVEKIT_SDK_VERSION:-2.19}"

dir="$(mktemp -d "${TMPDIR:-/tmp}/livekit-sdk.XXXXXX")"
trap 'rm -rf "$dir"' ERR

echo "livekit-sdk: installing livekit-server-sdk@$VERSION into $dir" >&2
npm install --prefix "$dir" --ignore-scripts --no-audit --no-fund --loglevel=error \
  "livekit-server-sdk@$VERSION" >&2

# The folder must be usable the way tests/interop/livekit-sdk.mjs loads it.
LIVEKIT_SDK_DIR="$dir" node -e '
  const { createRequire } = require("node:module");
  const sdk = createRequire(process.env.LIVEKIT_SDK_DIR + "/package.json")("livekit-server-sdk");
  for (const name of ["AccessToken", "TokenVerifier", "WebhookReceiver"]) {
    if (typeof sdk[name] !== "function") throw new Error("livekit-server-sdk lacks " + name);
  }
' >&2
echo "livekit-sdk: $(node -p "require('$dir/node_modules/livekit-server-sdk/package.json').version" 2>/dev/null || echo '?') installed" >&2

echo "$dir"

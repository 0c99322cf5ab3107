#!/usr/bin/env bash
# Validates the protocol contract in protocol/ (AsyncAPI document, JSON Schemas, examples).
# Installs @asyncapi/parser and ajv into a throwaway folder and runs .ci/protocol-check.mjs.
# Skips (exit 0, with a visible message) when node or npm is not installed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

for tool in node npm; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "SKIP protocol-check: '$tool' is not installed, the protocol contract was NOT validated"
    exit 0
  fi
done

# Pinned so that a new upstream release cannot break CI unannounced; bump deliberately.
PARSER_VERSION="${PROTOCOL_CHECK_PARSER_VERSION:-3.6.6}"
AJV_VERSION="${PROTOCOL_CHECK_AJV_VERSION:-8.20.0}"

tmpdir="$(mktemp -d)"
trap 'rm -rf "$tmpdir"' EXIT

echo "protocol-check: installing @asyncapi/parser@$PARSER_VERSION ajv@$AJV_VERSION into $tmpdir" >&2
npm install --no-save --prefix "$tmpdir" --ignore-scripts --no-audit --no-fund --loglevel=error \
  "@asyncapi/parser@$PARSER_VERSION" "ajv@$AJV_VERSION" >&2

NODE_PATH="$tmpdir/node_modules" node .ci/protocol-check.mjs

#!/usr/bin/env bash
# Prints an HS256 token for user $1 (default: a random one), valid for an hour, signed with
# MATCHGATE_JWT_SECRET (default: the dev secret of deploy/compose.yaml). Needs only openssl.
set -euo pipefail
secret=${MATCHGATE_JWT_SECRET:-dev-only-secret-do-not-use-in-production}
sub=${1:-user-$RANDOM$RANDOM}
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
header=$(printf '{"alg":"HS256","typ":"JWT"}' | b64url)
payload=$(printf '{"sub":"%s","exp":%d}' "$sub" "$(($(date +%s) + 3600))" | b64url)
signature=$(printf '%s.%s' "$header" "$payload" | openssl dgst -sha256 -hmac "$secret" -binary | b64url)
printf '%s.%s.%s\n' "$header" "$payload" "$signature"

#!/bin/bash
# What a match costs Redis, in figures that do not depend on what else the machine is doing:
# the commands the library runs per match (INFO commandstats) and, with --instructions, the
# instructions redis-server executes per match (valgrind's callgrind counts them; the same
# binaries and inputs give the same count on a loaded machine). BENCHMARKS.md, "Redis:
# commands and instructions per match", has the figures and the profile this prints.
#
#   cargo build --release --bin loadgen --bin matchgate
#   benches/redis_cost.sh [--instructions] [target/release] [duration_s] [users]
#
# Runs `loadgen cluster` (2 instances it starts itself) against a throw-away redis-server on
# a free loopback port. Matches are counted by Redis itself (the per-minute counters of
# sessions that went live), over the whole run, so that warm-up and window agree with the
# commands counted. Under callgrind Redis runs about 50 times slower: keep the users few.
set -euo pipefail

instructions=false
if [ "${1:-}" = "--instructions" ]; then
  instructions=true
  shift
fi
bin=${1:-target/release}
duration=${2:-8}
users=${3:-200}
if $instructions && [ $# -lt 3 ]; then users=40; fi

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
server=(redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir")
if $instructions; then
  valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" "${server[@]}" > "$dir/valgrind.log" 2>&1 &
else
  "${server[@]}" > "$dir/redis.log" 2>&1 &
fi
pid=$!
for _ in $(seq 1 200); do
  redis-cli -p "$port" ping > /dev/null 2>&1 && break
  sleep 0.1
done

MATCHGATE_JWT_SECRET=bench-secret-bench-secret-bench-secret "$bin/loadgen" cluster \
  --redis-url "redis://127.0.0.1:$port/" --redis-pid "$pid" --instances 2 --users "$users" \
  --warmup-s 1 --duration-s "$duration" > "$dir/loadgen.txt" 2>&1 || true
grep -E '^(matches|latency|errors|cpu|invariants)' "$dir/loadgen.txt" || cat "$dir/loadgen.txt"

redis-cli -p "$port" INFO commandstats > "$dir/commandstats.txt"
matches=0
for key in $(redis-cli -p "$port" --scan --pattern '*:matches:*'); do
  matches=$((matches + $(redis-cli -p "$port" GET "$key")))
done
redis-cli -p "$port" shutdown nosave > /dev/null 2>&1 || true
wait "$pid" || true
echo "sessions that went live over the whole run: $matches"

python3 - "$dir/commandstats.txt" "$matches" <<'EOF'
import re, sys
rows = []
for line in open(sys.argv[1]):
    m = re.match(r'cmdstat_(\w+):calls=(\d+),usec=(\d+)', line)
    if m:
        rows.append((m.group(1), int(m.group(2)), int(m.group(3))))
matches = max(int(sys.argv[2]), 1)
outside = {'fcall', 'publish', 'subscribe', 'info', 'function', 'ping', 'client', 'hello', 'config'}
inside = sum(calls for name, calls, _ in rows if name not in outside)
print(f'commands inside calls per match: {inside / matches:.1f}')
for name, calls, usec in sorted(rows, key=lambda r: -r[1]):
    print(f'  {name:14} {calls / matches:7.2f} per match')
EOF

if $instructions; then
  total=$(callgrind_annotate "$dir/callgrind.out" 2> /dev/null | grep -m1 'PROGRAM TOTALS' | tr -d , | awk '{print $1}')
  echo "redis-server instructions: $total; per match: $((total / (matches > 0 ? matches : 1)))"
  callgrind_annotate --inclusive=yes "$dir/callgrind.out" 2> /dev/null | grep -v '???:0x' | sed -n '20,60p'
fi

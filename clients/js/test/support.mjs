// Test harness: the real gateway binary on an ephemeral loopback port, HS256 tokens minted
// here, a TCP proxy that can cut or freeze connections for real, real redis-server processes,
// and an event recorder around a `Matchgate` client.
import { spawn, spawnSync } from "node:child_process";
import { createHmac } from "node:crypto";
import net from "node:net";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { setTimeout as sleep } from "node:timers/promises";
import WebSocket from "ws";
import { Matchgate } from "../dist/index.js";

export { sleep, WebSocket };

export const SECRET = "sdk-test-secret-that-is-at-least-32-bytes";
export const ADMIN_TOKEN = "sdk-test-admin-token-at-least-32-bytes-long";
export const BIN =
  process.env.MATCHGATE_BIN ?? fileURLToPath(new URL("../../../target/debug/matchgate", import.meta.url));

/**
 * Registers `cleanup` to run when test `t` ends, after everything registered later: clients
 * close before the proxy in front of the gateway goes, and the proxy before the gateway, so
 * that nothing reconnects during the teardown.
 */
const teardowns = new WeakMap();
export function onTeardown(t, cleanup) {
  let stack = teardowns.get(t);
  if (stack === undefined) {
    stack = [];
    teardowns.set(t, stack);
    t.after(async () => {
      while (stack.length > 0) await stack.pop()();
    });
  }
  stack.push(cleanup);
}

/** How long a test waits for something that should happen (never an assertion on speed). */
export const PATIENCE_MS = 20_000;

/**
 * Starts the gateway binary with `args` (besides a loopback listener on a free port, JSON logs
 * and the test's JWT secret); it is killed when the test ends.
 */
export async function startGateway(t, args = [], { listen = "127.0.0.1:0" } = {}) {
  const child = spawn(
    BIN,
    ["--listen", listen, "--log-format", "json", "--log", "info", "--jwt-secret", SECRET, ...args],
    { stdio: ["ignore", "pipe", "pipe"] },
  );
  let output = "";
  const exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
  const address = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`gateway did not start:\n${output}`)), PATIENCE_MS);
    const scan = (chunk) => {
      output += chunk;
      const match = /listening on (\d+\.\d+\.\d+\.\d+:\d+)/.exec(output);
      if (match) {
        clearTimeout(timer);
        resolve(match[1]);
      }
    };
    child.stdout.setEncoding("utf8").on("data", scan);
    child.stderr.setEncoding("utf8").on("data", scan);
    exited.then(() => {
      clearTimeout(timer);
      reject(new Error(`gateway exited at start:\n${output}`));
    });
  });
  const gateway = {
    address,
    port: Number(address.split(":")[1]),
    url: `ws://${address}/v1/ws`,
    http: `http://${address}`,
    exited,
    get log() {
      return output;
    },
    async stop(signal = "SIGKILL") {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      return exited;
    },
  };
  onTeardown(t, () => gateway.stop());
  return gateway;
}

/** An HS256 JWT for `sub`, signed with `secret`, expiring in `expInSecs`. */
export function mintToken(sub, { expInSecs = 3600, secret = SECRET } = {}) {
  const b64 = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const head = b64({ alg: "HS256", typ: "JWT" });
  const body = b64({ sub, exp: Math.floor(Date.now() / 1000) + expInSecs });
  const signature = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${signature}`;
}

/**
 * A `Matchgate` for `sub` (with the `ws` package unless `options.WebSocket` says otherwise),
 * short backoff, every event recorded; closed when the test ends.
 */
export function client(t, url, sub, options = {}) {
  const tokens = [];
  const mg = new Matchgate({
    url,
    WebSocket,
    backoff: { initialMs: 100, maxMs: 1000 },
    getToken: async () => {
      const token = mintToken(sub);
      tokens.push(token);
      return token;
    },
    ...options,
  });
  const log = record(mg);
  onTeardown(t, () => mg.close());
  return { mg, log, tokens };
}

const EVENTS = [
  "state",
  "welcome",
  "disconnected",
  "queued",
  "queue_update",
  "dequeued",
  "match_proposed",
  "match_cancelled",
  "matched",
  "session_ended",
  "peer_status",
  "signal",
  "chat",
  "token_expiring",
  "token_refreshed",
  "error",
];

/** Records every event of `mg` in order, and waits for the ones a test expects. */
export function record(mg) {
  const entries = [];
  const waiters = new Set();
  for (const event of EVENTS) {
    mg.on(event, (...args) => {
      entries.push({ event, args });
      for (const waiter of [...waiters]) waiter();
    });
  }
  const log = {
    entries,
    /** Position to search from: events recorded from now on. */
    mark: () => entries.length,
    all: (event, from = 0) => entries.slice(from).filter((e) => e.event === event).map((e) => e.args[0]),
    states: () => entries.filter((e) => e.event === "state").map((e) => e.args[0]),
    /** The first `event` at or after `from` whose first argument satisfies `predicate`. */
    waitFor(event, predicate = () => true, from = 0, timeoutMs = PATIENCE_MS) {
      return new Promise((resolve, reject) => {
        let index = from;
        const check = () => {
          for (; index < entries.length; index++) {
            const entry = entries[index];
            if (entry.event === event && predicate(entry.args[0], ...entry.args.slice(1))) {
              waiters.delete(check);
              clearTimeout(timer);
              resolve(entry.args[0]);
              return;
            }
          }
        };
        const timer = setTimeout(() => {
          waiters.delete(check);
          const seen = entries.map((e) => `${e.event}:${JSON.stringify(e.args[0])}`).join("\n  ");
          reject(new Error(`no ${event} event within ${timeoutMs} ms; recorded:\n  ${seen}`));
        }, timeoutMs);
        waiters.add(check);
        check();
      });
    },
    waitForState(state, from = 0) {
      return log.waitFor("state", (s) => s === state, from);
    },
  };
  return log;
}

/** Connects and matches two clients; returns both `matched` frames. */
export async function matchUp(a, b, prefs = { topic: `t${Math.random()}` }) {
  const fromA = a.log.mark();
  const fromB = b.log.mark();
  await a.mg.enqueue(prefs);
  await b.mg.enqueue(prefs);
  return [await a.log.waitFor("matched", undefined, fromA), await b.log.waitFor("matched", undefined, fromB)];
}

/** Alice (at `aliceUrl`) and bob (at `bobUrl`), connected and matched with each other. */
export async function matchedPair(t, aliceUrl, bobUrl = aliceUrl) {
  const a = client(t, aliceUrl, "alice");
  const b = client(t, bobUrl, "bob");
  await Promise.all([a.mg.connect(), b.mg.connect()]);
  const [ma, mb] = await matchUp(a, b);
  return { a, b, ma, mb };
}

/**
 * A TCP proxy on loopback in front of the gateway: `cut()` resets every connection (a real
 * drop, no WebSocket close frame), `down()` also refuses new ones until `up()`, `freeze()`
 * stops forwarding without closing (a dead network path).
 */
export async function startProxy(t, targetPort) {
  const pairs = new Set();
  const frozen = new Set();
  let refusing = false;
  let target = targetPort;
  let accepted = 0;
  const server = net.createServer((downstream) => {
    if (refusing) {
      downstream.resetAndDestroy();
      return;
    }
    accepted += 1;
    const upstream = net.connect(target, "127.0.0.1");
    const pair = { downstream, upstream };
    pairs.add(pair);
    downstream.pipe(upstream);
    upstream.pipe(downstream);
    const end = () => {
      pairs.delete(pair);
      downstream.destroy();
      upstream.destroy();
    };
    for (const socket of [downstream, upstream]) {
      socket.on("error", end);
      socket.on("close", end);
    }
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  const proxy = {
    url: `ws://127.0.0.1:${port}/v1/ws`,
    get accepted() {
      return accepted;
    },
    retarget(port) {
      target = port;
    },
    cut() {
      for (const { downstream, upstream } of pairs) {
        downstream.resetAndDestroy();
        upstream.resetAndDestroy();
      }
      pairs.clear();
    },
    down() {
      refusing = true;
      proxy.cut();
    },
    up() {
      refusing = false;
    },
    freeze() {
      for (const { downstream, upstream } of pairs) {
        downstream.unpipe(upstream);
        upstream.unpipe(downstream);
        downstream.pause();
        upstream.pause();
        frozen.add(downstream).add(upstream);
      }
      pairs.clear();
    },
  };
  onTeardown(t, () => {
    proxy.cut();
    for (const socket of frozen) socket.destroy();
    return new Promise((resolve) => server.close(resolve));
  });
  return proxy;
}

/** A free loopback TCP port (for processes that cannot report the port they bound). */
export async function freePort() {
  const server = net.createServer();
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

export function hasRedis() {
  return spawnSync("redis-server", ["--version"]).status === 0;
}

/** A private redis-server (no persistence) on a free loopback port; `restart()` brings it back
 * empty on the same port. Never a Redis already running on the machine. */
export async function startRedis(t) {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), "mg-sdk-redis-"));
  let child = null;
  const redis = {
    port,
    url: `redis://127.0.0.1:${port}/`,
    async start() {
      child = spawn(
        "redis-server",
        ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir],
        { stdio: "ignore" },
      );
      for (let i = 0; i < 200; i++) {
        if (spawnSync("redis-cli", ["-p", String(port), "ping"]).stdout?.toString().includes("PONG")) return;
        await sleep(50);
      }
      throw new Error(`redis-server did not start on port ${port}`);
    },
    async stop() {
      if (child === null) return;
      const exited = new Promise((resolve) => child.once("exit", resolve));
      child.kill("SIGKILL");
      await exited;
      child = null;
    },
  };
  await redis.start();
  onTeardown(t, async () => {
    await redis.stop();
    rmSync(dir, { recursive: true, force: true });
  });
  return redis;
}

/** POSTs a ban through the admin API. */
export async function ban(gateway, kind, value) {
  const response = await fetch(`${gateway.http}/v1/admin/bans`, {
    method: "POST",
    headers: { authorization: `Bearer ${ADMIN_TOKEN}`, "content-type": "application/json" },
    body: JSON.stringify({ kind, value, ttl_s: 600, reason: "sdk test" }),
  });
  if (response.status !== 201) throw new Error(`ban: HTTP ${response.status} ${await response.text()}`);
}

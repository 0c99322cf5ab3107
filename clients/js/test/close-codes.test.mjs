// Close codes and refused handshakes: the SDK does what protocol/README.md says a client
// should do for each, against the real gateway (and a real redis-server for 1013 and 4006).
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { CLOSE_POLICIES, closePolicy } from "../dist/index.js";
import {
  ADMIN_TOKEN,
  ban,
  client,
  hasRedis,
  matchedPair,
  mintToken,
  sleep,
  startGateway,
  startProxy,
  startRedis,
} from "./support.mjs";

/** Long enough that a client which (wrongly) reconnects would have done so: its backoff in
 * these tests starts at 100 ms. Waiting for something not to happen, not a timing check. */
const NO_RECONNECT_WINDOW_MS = 1500;

/** `c` was closed with `code` and does not come back. */
async function staysClosed(c, code, policy) {
  const closed = await c.log.waitFor("disconnected");
  assert.equal(closed.code, code);
  assert.equal(closed.policy, policy);
  assert.equal(closed.willReconnect, false);
  assert.equal(c.mg.state, "closed");
  await sleep(NO_RECONNECT_WINDOW_MS);
  assert.equal(c.log.all("welcome").length, 1, "no new connection");
}

test("the close-code policies are exactly the table of protocol/README.md", () => {
  const readme = readFileSync(new URL("../../../protocol/README.md", import.meta.url), "utf8");
  const section = readme.slice(readme.indexOf("### Close codes"), readme.indexOf("## Lifecycle"));
  const rows = [...section.matchAll(/^\| (\d{4}) \| [^|]+ \| ([^|]+) \|$/gm)];
  assert.ok(rows.length >= 12, "the table was found");
  const documented = rows.map(([, code]) => Number(code)).sort();
  assert.deepEqual(documented, Object.keys(CLOSE_POLICIES).map(Number).sort());
  for (const [, code, todo] of rows) {
    const policy = closePolicy(Number(code));
    const expected = /^nothing|fix the client|do not reconnect/.test(todo)
      ? "stop"
      : /start over/.test(todo)
        ? "restart"
        : /reconnect/.test(todo)
          ? "resume"
          : assert.fail(`no rule for ${code}: ${todo}`);
    assert.equal(policy.action, expected, `${code}: ${todo}`);
    if (expected !== "stop") {
      assert.equal(policy.delay, /after `retry_after_ms`/.test(todo) ? "server" : "backoff", `${code}: ${todo}`);
    }
  }
  // A socket that dies without a close frame, or a code from a newer gateway: resume.
  assert.equal(closePolicy(1006).action, "resume");
  assert.equal(closePolicy(4999).action, "resume");
});

test("4001 replaced: the old client stays closed, the new one stays connected", async (t) => {
  const gw = await startGateway(t);
  const first = client(t, gw.url, "alice");
  const second = client(t, gw.url, "alice");
  await first.mg.connect();
  await first.mg.enqueue();
  const welcome = await second.mg.connect();
  assert.equal(welcome.state, "queued", "the new connection took the state over");
  // Had the first one reconnected, it would have replaced the second (a 4001 ping-pong).
  await staysClosed(first, 4001, "replaced");
  assert.equal(second.log.all("disconnected").length, 0);
  assert.equal(second.mg.state, "queued");
});

test("4007 banned through the admin API: closed for good; a new connect() is refused (403 banned)", async (t) => {
  const gw = await startGateway(t, ["--admin-token", ADMIN_TOKEN]);
  const a = client(t, gw.url, "mallory");
  await a.mg.connect();
  await ban(gw, "user", "mallory");
  await staysClosed(a, 4007, "banned");

  const again = client(t, gw.url, "mallory");
  const error = await again.mg.connect().then(
    () => assert.fail("a banned user must not get in"),
    (e) => e,
  );
  assert.equal(error.code, "banned");
  assert.equal(error.status, 403);
  assert.equal(again.mg.state, "closed");
  assert.equal(again.tokens.length, 1, "no retry");
});

test("4004 error budget exhausted: the client stays closed", async (t) => {
  const gw = await startGateway(t, ["--error-budget", "2", "--error-budget-refill-ms", "600000"]);
  const a = client(t, gw.url, "alice");
  await a.mg.connect();
  const refusals = await Promise.allSettled([a.mg.skip(), a.mg.skip(), a.mg.skip()]);
  assert.ok(refusals.every((r) => r.status === "rejected"));
  await staysClosed(a, 4004, "too_many_errors");
});

test("1001 drain: reconnects after the gateway's retry_after_ms, to the next gateway", async (t) => {
  const old = await startGateway(t, ["--reconnect-jitter-ms", "0"]);
  const next = await startGateway(t);
  const proxy = await startProxy(t, old.port);
  // A backoff this long would show if the SDK used it instead of retry_after_ms (0 here).
  const a = client(t, proxy.url, "alice", { backoff: { initialMs: 60_000, maxMs: 60_000 } });
  const first = await a.mg.connect();
  proxy.retarget(next.port);
  const from = a.log.mark();
  await old.stop("SIGTERM");
  const closed = await a.log.waitFor("disconnected");
  assert.equal(closed.code, 1001);
  assert.equal(closed.policy, "going_away");
  assert.equal(closed.willReconnect, true);
  assert.equal(closed.retryInMs, 0, "the gateway's retry_after_ms, not the backoff");
  const welcome = await a.log.waitFor("welcome", (w) => w.connection_id !== first.connection_id);
  assert.equal(welcome.resumed, false, "the next gateway does not know the old one's resume token");
  await a.log.waitForState("idle", from);
});

test("429 at the handshake: waits for Retry-After, then gets in", async (t) => {
  const gw = await startGateway(t, ["--ip-connects-per-minute", "30"]);
  // Spend this address's handshake allowance (every attempt counts, before the token is read).
  for (let i = 0; i < 30; i++) await fetch(`${gw.http}/v1/ws`).then((r) => r.arrayBuffer());
  const a = client(t, gw.url, "alice");
  const connected = a.mg.connect();
  const refused = await a.log.waitFor("error");
  assert.equal(refused.code, "rate_limited");
  assert.equal(refused.status, 429);
  assert.ok(refused.retry_after_ms > 0);
  const scheduled = await a.log.waitFor("disconnected");
  assert.equal(scheduled.status, 429);
  assert.ok(scheduled.retryInMs >= refused.retry_after_ms, "the delay honours retry_after_ms");
  await connected;
  assert.equal(a.mg.state, "idle");
});

test("503 at the handshake (connection limit): waits for Retry-After, then gets in", async (t) => {
  const gw = await startGateway(t, ["--max-connections", "1"]);
  const a = client(t, gw.url, "alice");
  await a.mg.connect();
  const b = client(t, gw.url, "bob");
  const connected = b.mg.connect();
  const refused = await b.log.waitFor("error");
  assert.equal(refused.code, "unavailable");
  assert.equal(refused.status, 503);
  assert.equal(refused.retry_after_ms, 5000, "Retry-After: 5");
  const scheduled = await b.log.waitFor("disconnected");
  assert.ok(scheduled.retryInMs >= 5000);
  a.mg.close();
  await connected;
  assert.equal(b.mg.state, "idle");
});

test("401: a refused token makes the SDK call getToken again", async (t) => {
  const gw = await startGateway(t);
  const handed = [];
  const a = client(t, gw.url, "alice", {
    getToken: async () => {
      const secret = handed.length === 0 ? "a-different-secret-of-at-least-32-bytes" : undefined;
      const token = mintToken("alice", secret ? { secret } : {});
      handed.push(token);
      return token;
    },
  });
  await a.mg.connect();
  assert.equal(handed.length, 2);
  const [refused] = a.log.all("error");
  assert.equal(refused.code, "unauthorized");
  assert.equal(refused.status, 401);
  assert.equal(a.mg.state, "idle");
});

test("a cached token about to expire is renewed before a reconnect, not sent to be refused", async (t) => {
  const gw = await startGateway(t, ["--jwt-leeway-secs", "0"]);
  const proxy = await startProxy(t, gw.port);
  const handed = [];
  const a = client(t, proxy.url, "alice", {
    getToken: async () => {
      const token = mintToken("alice", { expInSecs: 11 });
      handed.push(token);
      return token;
    },
  });
  await a.mg.connect();
  await a.mg.enqueue();
  await sleep(1500); // the token now expires within the SDK's 10 s renewal margin
  const from = a.log.mark();
  proxy.cut();
  const welcome = await a.log.waitFor("welcome", undefined, from);
  assert.equal(welcome.resumed, true);
  assert.equal(handed.length, 2);
  assert.equal(a.log.all("error").length, 0, "no refused handshake");
});

test("1013 while the backend is down, then 4006 when it returns empty: start over", { skip: !hasRedis() && "redis-server is not installed" }, async (t) => {
  const redis = await startRedis(t);
  const gw = await startGateway(t, ["--redis-url", redis.url, "--instance-heartbeat-ms", "200"]);
  const { a } = await matchedPair(t, gw.url);
  const fromA = a.log.mark();

  await redis.stop();
  // A newcomer is told `unavailable`, then closed with 1013; it backs off and tries again.
  const c = client(t, gw.url, "carol");
  const connected = c.mg.connect();
  const unavailable = await c.log.waitFor("error", (e) => e.code === "unavailable");
  assert.ok(unavailable.retry_after_ms > 0);
  const later = await c.log.waitFor("disconnected", (d) => d.code === 1013);
  assert.equal(later.policy, "try_again_later");
  assert.equal(later.willReconnect, true);
  assert.ok(later.retryInMs >= unavailable.retry_after_ms);

  await redis.start(); // empty: every held state is gone
  const lost = await a.log.waitFor("disconnected", (d) => d.code === 4006, fromA);
  assert.equal(lost.policy, "state_lost");
  assert.equal(lost.willReconnect, true);
  assert.equal(lost.resume, false, "starts over: no resume token");
  const welcome = await a.log.waitFor("welcome", undefined, fromA);
  assert.equal(welcome.resumed, false);
  await a.log.waitForState("idle", fromA);
  assert.equal(a.mg.session, null);
  await connected;
  assert.equal(c.mg.state, "idle");
});

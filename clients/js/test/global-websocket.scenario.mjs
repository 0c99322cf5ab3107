// Run by global-websocket.test.mjs in a Node that has a global WebSocket (Node 20 with
// --experimental-websocket, Node 22+): the SDK with no `WebSocket` option uses it. That
// WebSocket, like a browser's, hides the HTTP status of a refused handshake.
import { test } from "node:test";
import assert from "node:assert/strict";
import { client, matchUp, mintToken, startGateway, startProxy } from "./support.mjs";

assert.equal(typeof globalThis.WebSocket, "function", "this scenario needs a global WebSocket");
const NATIVE = { WebSocket: undefined };

test("connect, match and resume after a dropped socket with the global WebSocket", async (t) => {
  const gw = await startGateway(t);
  const proxy = await startProxy(t, gw.port);
  const a = client(t, proxy.url, "alice", NATIVE);
  const b = client(t, gw.url, "bob", NATIVE);
  await Promise.all([a.mg.connect(), b.mg.connect()]);
  const [ma] = await matchUp(a, b);
  const from = a.log.mark();
  proxy.cut();
  const welcome = await a.log.waitFor("welcome", undefined, from);
  assert.equal(welcome.resumed, true);
  await a.log.waitForState("matched", from);
  assert.equal(a.mg.session.session_id, ma.session_id);
});

test("a refused token (status hidden): the next attempt asks getToken for a new one", async (t) => {
  const gw = await startGateway(t);
  const handed = [];
  const a = client(t, gw.url, "alice", {
    ...NATIVE,
    getToken: async () => {
      const secret = handed.length === 0 ? "a-different-secret-of-at-least-32-bytes" : undefined;
      handed.push(mintToken("alice", secret ? { secret } : {}));
      return handed.at(-1);
    },
  });
  await a.mg.connect();
  assert.equal(handed.length, 2);
  const [failed] = a.log.all("error");
  assert.equal(failed.code, "handshake_failed");
  assert.equal(failed.status, undefined, "the platform does not say why");
});

test("a busy gateway (status hidden): retried with backoff until there is room", async (t) => {
  const gw = await startGateway(t, ["--max-connections", "1"]);
  const a = client(t, gw.url, "alice", NATIVE);
  await a.mg.connect();
  const b = client(t, gw.url, "bob", NATIVE);
  const connected = b.mg.connect();
  await b.log.waitFor("disconnected", (d) => d.policy === "handshake_failed");
  await b.log.waitFor("disconnected", (d) => d.policy === "handshake_failed" && d.retryInMs > 0, b.log.mark());
  a.mg.close();
  await connected;
  assert.equal(b.mg.state, "idle");
});

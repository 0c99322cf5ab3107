// Resume after real socket drops (a TCP proxy between the SDK and the gateway resets the
// connection, or stops forwarding): the session or queue place is kept and what was missed is
// replayed exactly once.
import { test } from "node:test";
import assert from "node:assert/strict";
import { client, matchedPair, startGateway, startProxy } from "./support.mjs";

test("a dropped socket resumes into the same session; the peer sees reconnecting, then connected", async (t) => {
  const gw = await startGateway(t);
  const proxy = await startProxy(t, gw.port);
  const { a, b, ma } = await matchedPair(t, proxy.url, gw.url);
  const fromA = a.log.mark();
  const fromB = b.log.mark();

  proxy.cut();
  const drop = await a.log.waitFor("disconnected", undefined, fromA);
  assert.equal(drop.code, 1006);
  assert.equal(drop.policy, "dropped");
  assert.equal(drop.willReconnect, true);
  assert.equal(drop.resume, true);
  const welcome = await a.log.waitFor("welcome", undefined, fromA);
  assert.equal(welcome.resumed, true);
  assert.equal(welcome.state, "in_session");
  await a.log.waitForState("matched", fromA);
  assert.deepEqual(a.log.states().slice(-2), ["reconnecting", "matched"]);
  assert.equal(a.mg.session.session_id, ma.session_id);
  assert.equal(a.mg.session.role, "offerer", "the session is kept with what matched said");

  await b.log.waitFor("peer_status", (f) => f.state === "reconnecting", fromB);
  await b.log.waitFor("peer_status", (f) => f.state === "connected", fromB);
  assert.equal(b.mg.state, "matched");
  // The resumed connection works: a request goes through it.
  assert.equal((await a.mg.status()).session_id, ma.session_id);
});

test("events missed while the socket was down are replayed once, in order", async (t) => {
  const gw = await startGateway(t);
  const proxy = await startProxy(t, gw.port);
  const { a, b, ma } = await matchedPair(t, proxy.url, gw.url);
  const fromA = a.log.mark();

  proxy.down(); // cut, and refuse reconnects until up()
  await a.log.waitForState("reconnecting", fromA);
  const skipped = await b.mg.skip(); // alice misses session_ended and her queued
  assert.equal(skipped.reason, "skip");
  await b.log.waitFor("queued", (f) => f.seq > skipped.seq);
  // Attempts fail meanwhile (a refused TCP connection), with backoff.
  await a.log.waitFor("disconnected", (d) => d.policy === "handshake_failed", fromA);
  proxy.up();

  const welcome = await a.log.waitFor("welcome", undefined, fromA);
  assert.equal(welcome.resumed, true);
  await a.log.waitForState("queued", fromA);
  const ended = a.log.all("session_ended", fromA);
  assert.equal(ended.length, 1, "session_ended replayed exactly once");
  assert.equal(ended[0].session_id, ma.session_id);
  assert.equal(ended[0].reason, "peer_skipped");
  const queued = a.log.all("queued", fromA);
  assert.equal(queued.length, 1, "queued replayed exactly once");
  assert.equal(queued[0].seq, ended[0].seq + 1);
  assert.equal(a.mg.session, null);
  // The state went from reconnecting straight to where the replay leads.
  assert.deepEqual(a.log.states().slice(-2), ["reconnecting", "queued"]);

  // Another drop with nothing missed replays nothing.
  const again = a.log.mark();
  proxy.cut();
  const second = await a.log.waitFor("welcome", undefined, again);
  assert.equal(second.resumed, true);
  await a.log.waitForState("queued", again);
  assert.equal(a.log.all("queued", again).length, 0);
  assert.equal(a.log.all("session_ended", again).length, 0);
});

test("a frozen connection (no traffic, no close) is noticed by the heartbeat and replaced", async (t) => {
  const gw = await startGateway(t, ["--heartbeat-interval-ms", "400"]);
  const proxy = await startProxy(t, gw.port);
  const a = client(t, proxy.url, "alice");
  await a.mg.connect();
  await a.mg.enqueue();
  const from = a.log.mark();

  proxy.freeze();
  const drop = await a.log.waitFor("disconnected", undefined, from);
  assert.equal(drop.policy, "dropped");
  assert.match(drop.reason, /nothing received/);
  const welcome = await a.log.waitFor("welcome", undefined, from);
  assert.equal(welcome.resumed, true);
  assert.equal(welcome.state, "queued");
  await a.log.waitForState("queued", from);
  assert.equal(proxy.accepted, 2);
});

test("a connection that cannot resume into a held session learns the session from status", async (t) => {
  const gw = await startGateway(t, ["--resume-grace-ms", "60000"]);
  const proxy = await startProxy(t, gw.port);
  const { a, b, ma } = await matchedPair(t, proxy.url, gw.url);
  // A second connection of alice (another tab) takes the session over without resuming...
  const other = client(t, gw.url, "alice");
  const welcome = await other.mg.connect();
  assert.equal(welcome.resumed, false);
  assert.equal(welcome.state, "in_session");
  // ...and learns which session it is from status before connect() resolves.
  assert.equal(other.mg.state, "matched");
  assert.equal(other.mg.session.session_id, ma.session_id);
  assert.equal(other.mg.session.role, "offerer");
});

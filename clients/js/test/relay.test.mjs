// Signal and chat relay through the SDK against the real gateway, and what `matched` carries
// for peer-to-peer calls.
import { test } from "node:test";
import assert from "node:assert/strict";
import { client, matchedPair, startGateway, startProxy } from "./support.mjs";

test("signals reach the peer in order, each acknowledged; a burst of 50 candidates passes", async (t) => {
  const gw = await startGateway(t);
  const { a, b, ma } = await matchedPair(t, gw.url);
  const from = b.log.mark();
  const acks = await Promise.all(
    Array.from({ length: 50 }, (_, i) => a.mg.signal({ kind: "candidate", n: i })),
  );
  assert.ok(acks.every((ack) => ack.type === "ack" && ack.action === "signal"));
  await b.log.waitFor("signal", (f) => f.payload.n === 49, from);
  const received = b.log.all("signal", from);
  assert.deepEqual(
    received.map((f) => f.payload.n),
    Array.from({ length: 50 }, (_, i) => i),
  );
  for (const frame of received) {
    assert.equal(frame.session_id, ma.session_id);
    assert.equal("seq" in frame, false, "signals are not logged");
  }
});

test("a signal of a real SDP's size (8 KB, above max_message_bytes) passes", async (t) => {
  const gw = await startGateway(t);
  const { a, b } = await matchedPair(t, gw.url);
  assert.ok(a.mg.welcome.max_signal_bytes >= 8192);
  const sdp = "a=candidate:0 1 UDP 2122252543 127.0.0.1 40000 typ host\r\n".repeat(150).slice(0, 8000);
  const from = b.log.mark();
  await a.mg.signal({ mg: "sdp", description: { type: "offer", sdp } });
  const frame = await b.log.waitFor("signal", undefined, from);
  assert.equal(frame.payload.description.sdp, sdp);
});

test("signals: refused without a session, over max_signal_bytes, or not an object; the connection stays", async (t) => {
  const gw = await startGateway(t, ["--max-signal-bytes", "2048"]);
  const a = client(t, gw.url, "alice");
  await a.mg.connect();
  assert.equal(a.mg.welcome.max_signal_bytes, 2048);
  await assert.rejects(a.mg.signal({ hello: 1 }), (e) => e.code === "invalid_state" && e.frame?.type === "error");
  await assert.rejects(a.mg.signal({ big: "x".repeat(3000) }), { code: "bad_request" });
  await assert.rejects(a.mg.signal([1, 2]), { code: "bad_request" });
  assert.equal((await a.mg.status()).state, "idle");
  assert.equal(a.log.all("disconnected").length, 0);
});

test("signals are not replayed: a peer that was away gets none of them after resuming", async (t) => {
  const gw = await startGateway(t);
  const proxy = await startProxy(t, gw.port);
  const { a, b } = await matchedPair(t, proxy.url, gw.url);
  const from = a.log.mark();
  proxy.down();
  await a.log.waitForState("reconnecting", from);
  await b.log.waitFor("peer_status", (f) => f.state === "reconnecting");
  await b.mg.signal({ note: "sent while alice is away" }).catch(() => {});
  await b.mg.chat("are you there?").catch(() => {});
  proxy.up();
  const welcome = await a.log.waitFor("welcome", undefined, from);
  assert.equal(welcome.resumed, true);
  await a.log.waitForState("matched", from);
  // A signal sent now arrives; the one sent while away never does.
  await b.mg.signal({ note: "after" });
  const after = await a.log.waitFor("signal", undefined, from);
  assert.equal(after.payload.note, "after");
  assert.equal(a.log.all("signal", from).length, 1);
  assert.equal(a.log.all("chat", from).length, 0);
});

test("chat: the text reaches the peer with sent_at_ms; the gateway refuses bad text clearly", async (t) => {
  const gw = await startGateway(t);
  const { a, b, ma } = await matchedPair(t, gw.url);
  const from = b.log.mark();
  const ack = await a.mg.chat("hello, stranger 👋");
  assert.equal(ack.type, "ack");
  assert.equal(ack.action, "chat");
  const message = await b.log.waitFor("chat", undefined, from);
  assert.equal(message.text, "hello, stranger 👋");
  assert.equal(message.session_id, ma.session_id);
  assert.equal(typeof message.sent_at_ms, "number");
  await assert.rejects(a.mg.chat(""), (e) => e.code === "bad_request" && e.frame?.type === "error");
  await assert.rejects(a.mg.chat("x".repeat(1001)), (e) => e.code === "bad_request" && e.frame?.type === "error");
  await assert.rejects(a.mg.chat("ring\u0007"), (e) => e.code === "bad_request" && e.frame?.type === "error");
  assert.equal(b.log.all("chat", from).length, 1, "refused messages never reach the peer");
});

test("matched carries p2p media with ICE servers; call() needs a browser's RTCPeerConnection", async (t) => {
  const gw = await startGateway(t);
  const { a, ma, mb } = await matchedPair(t, gw.url);
  for (const m of [ma, mb]) {
    assert.equal(m.media.provider, "p2p");
    assert.ok(Array.isArray(m.media.ice_servers));
  }
  assert.equal(a.mg.session.media.provider, "p2p");
  assert.throws(() => a.mg.call(), { code: "invalid_state", message: /RTCPeerConnection/ });
  await a.mg.end();
  assert.throws(() => a.mg.call(), { code: "invalid_state", message: /matched/ });
});

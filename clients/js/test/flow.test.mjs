// The protocol flow through the SDK against the real gateway: connect, queue, match, skip,
// end, block, report, the accept phase, and how requests settle.
import { test } from "node:test";
import assert from "node:assert/strict";
import { MatchgateError } from "../dist/index.js";
import { client, matchedPair, startGateway } from "./support.mjs";

test("connect: welcome, then the user's state; connect() resolves with the welcome", async (t) => {
  const gw = await startGateway(t);
  const a = client(t, gw.url, "alice");
  assert.equal(a.mg.state, "closed");
  const welcome = await a.mg.connect();
  assert.equal(welcome.type, "welcome");
  assert.equal(welcome.user_id, "alice");
  assert.equal(welcome.resumed, false);
  assert.equal(a.mg.state, "idle");
  assert.deepEqual(a.log.states(), ["connecting", "idle"]);
  assert.equal(a.tokens.length, 1);
  // A second connect() while connected is the same connection.
  assert.equal(await a.mg.connect(), welcome);
  assert.equal(a.log.all("welcome").length, 1);
});

test("two clients: enqueue, queued, matched; skip puts both back; end leaves", async (t) => {
  const gw = await startGateway(t);
  const a = client(t, gw.url, "alice");
  const b = client(t, gw.url, "bob");
  await Promise.all([a.mg.connect(), b.mg.connect()]);

  const queued = await a.mg.enqueue({ language: "en" });
  assert.equal(queued.type, "queued");
  assert.equal(queued.position, 0);
  assert.equal(a.mg.state, "queued");
  await b.mg.enqueue({ language: "en" });
  const ma = await a.log.waitFor("matched");
  const mb = await b.log.waitFor("matched");
  assert.equal(ma.session_id, mb.session_id);
  assert.equal(ma.role, "offerer", "alice waited longer");
  assert.equal(mb.role, "answerer");
  assert.equal(a.mg.state, "matched");
  assert.equal(a.mg.session.session_id, ma.session_id);
  assert.deepEqual(a.log.states(), ["connecting", "idle", "queued", "matched"]);

  const fromB = b.log.mark();
  const ended = await a.mg.skip();
  assert.equal(ended.type, "session_ended");
  assert.equal(ended.reason, "skip");
  assert.equal(ended.requeued, true);
  const peerEnded = await b.log.waitFor("session_ended", undefined, fromB);
  assert.equal(peerEnded.reason, "peer_skipped");
  await a.log.waitFor("queued", (f) => f.seq > ended.seq);
  await b.log.waitFor("queued", undefined, fromB);
  assert.equal(a.mg.state, "queued");
  assert.equal(b.mg.state, "queued");
  assert.equal(a.mg.session, null);

  const left = await a.mg.end();
  assert.equal(left.type, "dequeued");
  assert.equal(left.reason, "end");
  assert.equal(a.mg.state, "idle");
  const leftToo = await b.mg.end();
  assert.equal(leftToo.type, "dequeued");
  assert.equal(b.mg.state, "idle");
});

test("report and block are acknowledged; block ends the session for both", async (t) => {
  const gw = await startGateway(t);
  const { a, b, ma } = await matchedPair(t, gw.url);

  const reported = await a.mg.report("spam", "sells things");
  assert.equal(reported.type, "ack");
  assert.equal(reported.action, "report");
  assert.equal(a.mg.state, "matched", "a report changes nothing else");

  const fromA = a.log.mark();
  const fromB = b.log.mark();
  const blocked = await a.mg.block();
  assert.equal(blocked.type, "ack");
  assert.equal(blocked.action, "block");
  const mine = await a.log.waitFor("session_ended", undefined, fromA);
  const theirs = await b.log.waitFor("session_ended", undefined, fromB);
  assert.equal(mine.session_id, ma.session_id);
  assert.equal(mine.reason, "end");
  assert.equal(theirs.reason, "peer_ended");
  assert.equal(a.mg.state, "idle");
  assert.equal(b.mg.state, "idle");

  // Blocking the same session again by its id is harmless.
  const again = await a.mg.block(ma.session_id);
  assert.equal(again.action, "block");
});

test("a refused request rejects with the gateway's error frame; nothing changes", async (t) => {
  const gw = await startGateway(t);
  const a = client(t, gw.url, "alice");
  await a.mg.connect();
  const error = await a.mg.skip().then(
    () => assert.fail("skip while idle must be refused"),
    (e) => e,
  );
  assert.ok(error instanceof MatchgateError);
  assert.equal(error.code, "invalid_state");
  assert.equal(error.frame.type, "error");
  assert.equal(error.frame.ref, error.ref);
  assert.equal(a.mg.state, "idle");
  // It is the promise's error, not an `error` event as well.
  assert.equal(a.log.all("error").length, 0);
  const status = await a.mg.status();
  assert.equal(status.state, "idle");
});

test("requests while not connected reject at once with not_connected; none is queued", async (t) => {
  const gw = await startGateway(t);
  const a = client(t, gw.url, "alice");
  await assert.rejects(a.mg.enqueue(), { code: "not_connected" });
  await a.mg.connect();
  a.mg.close();
  assert.equal(a.mg.state, "closed");
  await assert.rejects(a.mg.chat("hello"), { code: "not_connected" });
  await assert.rejects(a.mg.accept(), { code: "not_connected" });
  // Closing rejects what was waiting, and connect() starts afresh.
  const welcome = await a.mg.connect();
  assert.equal(welcome.resumed, false);
  assert.equal(a.mg.state, "idle");
});

test("a frame over max_message_bytes is refused before it could close the connection", async (t) => {
  const gw = await startGateway(t, ["--max-message-bytes", "512"]);
  const a = client(t, gw.url, "alice");
  await a.mg.connect();
  await assert.rejects(a.mg.report("other", "x".repeat(500)), { code: "bad_request" });
  // Still connected: the same connection answers.
  assert.equal((await a.mg.status()).state, "idle");
  assert.equal(a.log.all("disconnected").length, 0);
});

test("accept phase: proposed, both accept, matched", async (t) => {
  const gw = await startGateway(t, ["--accept-timeout-ms", "15000"]);
  const a = client(t, gw.url, "alice");
  const b = client(t, gw.url, "bob");
  await Promise.all([a.mg.connect(), b.mg.connect()]);
  await assert.rejects(a.mg.accept(), { code: "invalid_state" });
  await a.mg.enqueue();
  await b.mg.enqueue();
  const pa = await a.log.waitFor("match_proposed");
  await b.log.waitFor("match_proposed");
  assert.equal(a.mg.state, "proposed");
  assert.equal(a.mg.proposal.match_id, pa.match_id);
  const ack = await a.mg.accept();
  assert.equal(ack.action, "accept");
  assert.equal(a.mg.state, "proposed", "matched only once both accepted");
  await b.mg.accept();
  const ma = await a.log.waitFor("matched");
  assert.equal(ma.session_id, pa.match_id);
  await b.log.waitFor("matched");
  assert.equal(a.mg.state, "matched");
  assert.equal(a.mg.proposal, null);
});

test("accept phase: a decline cancels for both; the decliner is idle, the other queued", async (t) => {
  const gw = await startGateway(t, ["--accept-timeout-ms", "15000"]);
  const a = client(t, gw.url, "alice");
  const b = client(t, gw.url, "bob");
  await Promise.all([a.mg.connect(), b.mg.connect()]);
  await a.mg.enqueue();
  await b.mg.enqueue();
  await a.log.waitFor("match_proposed");
  await b.log.waitFor("match_proposed");
  const ack = await b.mg.decline();
  assert.equal(ack.action, "decline");
  const mine = await b.log.waitFor("match_cancelled");
  const theirs = await a.log.waitFor("match_cancelled");
  assert.equal(mine.reason, "declined");
  assert.equal(theirs.reason, "peer_declined");
  assert.equal(b.mg.state, "idle");
  assert.equal(a.mg.state, "queued");
});

test("interests: the shared tags are in matched and mg.session; a refused want rejects with its code", async (t) => {
  const gw = await startGateway(t, ["--interests-wait-ms", "3600000"]);
  const a = client(t, gw.url, "alice");
  const b = client(t, gw.url, "bob");
  await Promise.all([a.mg.connect(), b.mg.connect()]);

  // No attribute is filterable on this gateway: the want is refused, nothing changes.
  await assert.rejects(a.mg.enqueue({ want: { country: ["de"] } }), (e) => {
    assert.ok(e instanceof MatchgateError);
    assert.equal(e.code, "bad_request");
    assert.match(e.message, /prefs\.want\.country/);
    return true;
  });
  assert.equal(a.mg.state, "idle");

  await a.mg.enqueue({ interests: [" Jazz", "chess"] });
  await b.mg.enqueue({ interests: ["CHESS", "go", "jazz"] });
  const ma = await a.log.waitFor("matched");
  const mb = await b.log.waitFor("matched");
  assert.deepEqual(ma.common_interests, ["chess", "jazz"]);
  assert.deepEqual(mb.common_interests, ["chess", "jazz"]);
  assert.deepEqual(a.mg.session.common_interests, ["chess", "jazz"]);
});

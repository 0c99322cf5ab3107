// Live token expiry: the SDK answers `token_expiring` with a `refresh` carrying a new token
// from `getToken`; a refused refresh is an `error` event, and the close that follows (4008)
// reconnects with a new token and resumes.
import { test } from "node:test";
import assert from "node:assert/strict";
import { client, mintToken, sleep, startGateway } from "./support.mjs";

/** Connections close as soon as their token expires: no leeway, no grace. */
const STRICT = ["--jwt-leeway-secs", "0", "--token-expiry-grace-ms", "0"];

/** `getToken` that hands out `tokens` in order, then long-lived tokens for `sub`. */
function scripted(sub, tokens) {
  const queue = [...tokens];
  return async () => queue.shift() ?? mintToken(sub);
}

test("token_expiring is answered with a refresh, and the connection outlives its first token", async (t) => {
  const gw = await startGateway(t, STRICT);
  const firstExpMs = (Math.floor(Date.now() / 1000) + 2) * 1000;
  const a = client(t, gw.url, "dana", { getToken: scripted("dana", [mintToken("dana", { expInSecs: 2 })]) });
  await a.mg.connect();
  const notice = await a.log.waitFor("token_expiring");
  assert.ok(Math.abs(notice.expires_at_ms - firstExpMs) <= 1000, JSON.stringify(notice));
  const ack = await a.log.waitFor("token_refreshed");
  assert.equal(ack.type, "ack");
  assert.equal(ack.action, "refresh");
  // Past the first token's expiry the connection is still the first one.
  while (Date.now() < notice.expires_at_ms + 1500) await sleep(100);
  assert.equal((await a.mg.status()).state, "idle");
  assert.deepEqual(a.log.all("disconnected"), []);
  assert.deepEqual(a.log.all("error"), []);
  assert.equal(a.log.all("welcome").length, 1);
});

test("a refused refresh is an error event; the expired connection closes with 4008 and comes back", async (t) => {
  const gw = await startGateway(t, STRICT);
  const a = client(t, gw.url, "erin", {
    getToken: scripted("erin", [mintToken("erin", { expInSecs: 2 }), mintToken("mallory")]),
  });
  await a.mg.connect();
  await a.mg.enqueue({ topic: "expiry" });
  const refused = await a.log.waitFor("error");
  assert.equal(refused.code, "unauthorized");
  assert.match(refused.message, /another user/);
  const dropped = await a.log.waitFor("disconnected");
  assert.equal(dropped.code, 4008);
  assert.equal(dropped.policy, "token_expired");
  const back = await a.log.waitFor("welcome", (w) => w.resumed);
  assert.equal(back.user_id, "erin");
  assert.equal(back.state, "queued", "the queue place was kept");
});

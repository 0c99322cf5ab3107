// Heartbeats: the SDK keeps a connection alive by itself past the gateway's heartbeat timeout.
import { test } from "node:test";
import assert from "node:assert/strict";
import { client, sleep, startGateway } from "./support.mjs";

test("heartbeats keep an idle connection open well past the heartbeat timeout", async (t) => {
  // Interval 200 ms, timeout 400 ms: without heartbeats the gateway closes with 4002 at once.
  const gw = await startGateway(t, ["--heartbeat-interval-ms", "200"]);
  const a = client(t, gw.url, "alice");
  const welcome = await a.mg.connect();
  assert.equal(welcome.heartbeat_interval_ms, 200);
  assert.equal(welcome.heartbeat_timeout_ms, 400);
  await a.mg.enqueue();
  await sleep(3000); // more than seven heartbeat timeouts of silence from the app
  assert.deepEqual(a.log.all("disconnected"), []);
  assert.equal(a.log.all("welcome").length, 1);
  assert.equal(a.mg.state, "queued");
  assert.equal((await a.mg.status()).state, "queued");
});

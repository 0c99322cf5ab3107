// Runs global-websocket.scenario.mjs under Node's own WebSocket: the global one where this
// Node has it, else with --experimental-websocket (Node 20).
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { fileURLToPath } from "node:url";

const scenario = fileURLToPath(new URL("./global-websocket.scenario.mjs", import.meta.url));
const flag = "--experimental-websocket";
const needsFlag = typeof globalThis.WebSocket !== "function";
const unavailable = needsFlag && !process.allowedNodeEnvironmentFlags.has(flag);

test("the SDK on Node's own WebSocket (global)", { skip: unavailable && "this Node has no WebSocket at all" }, () => {
  const args = [...(needsFlag ? [flag] : []), "--test", "--test-reporter=spec", scenario];
  // Not as a child of this test runner (which would take its output for its own protocol).
  const env = { ...process.env };
  delete env.NODE_TEST_CONTEXT;
  const run = spawnSync(process.execPath, args, { encoding: "utf8", env, timeout: 180_000 });
  assert.equal(run.status, 0, `scenario failed:\n${run.stdout}\n${run.stderr}`);
  assert.match(run.stdout, /ℹ pass 3\b/);
  assert.match(run.stdout, /ℹ fail 0\b/);
});

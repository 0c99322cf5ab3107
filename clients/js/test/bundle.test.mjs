// The build: dist/index.js is one ES module without imports (the gateway embeds it as is),
// and the SDK refuses clearly to start without a WebSocket.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { spawnSync } from "node:child_process";

const bundle = new URL("../dist/index.js", import.meta.url);

test("dist/index.js is self-contained: no import statement, no dynamic import", () => {
  const code = readFileSync(bundle, "utf8");
  assert.doesNotMatch(code, /^\s*import[\s{*"']/m);
  assert.doesNotMatch(code, /\bimport\s*\(/);
  assert.doesNotMatch(code, /^\s*export\s[^;]*\sfrom\s/m);
  assert.doesNotMatch(code, /\brequire\s*\(/);
});

test("dist/index.js loads from a data: URL, where no relative import could resolve", async () => {
  const code = readFileSync(bundle, "utf8");
  const module = await import(`data:text/javascript;base64,${Buffer.from(code).toString("base64")}`);
  for (const name of ["Matchgate", "MatchgateError", "Call", "closePolicy", "CLOSE_POLICIES", "backoffDelay"]) {
    assert.ok(name in module, `exports ${name}`);
  }
});

test("without a global WebSocket and none passed, the constructor says what to do", () => {
  const script = `
    delete globalThis.WebSocket;
    const { Matchgate } = await import(${JSON.stringify(bundle.href)});
    try { new Matchgate({ url: "ws://127.0.0.1:1/v1/ws", getToken: () => "t" }); console.log("constructed"); }
    catch (e) { console.log(e.constructor.name + ": " + e.message); }`;
  const run = spawnSync(process.execPath, ["--input-type=module", "-e", script], { encoding: "utf8" });
  assert.equal(run.status, 0, run.stderr);
  assert.match(run.stdout, /^TypeError: .*no WebSocket.*"ws"/);
});

test("backoff: jittered, growing, capped", async () => {
  const { backoffDelay } = await import(bundle.href);
  for (let i = 0; i < 200; i++) {
    const first = backoffDelay(0, 500, 30_000);
    assert.ok(first >= 0 && first < 500);
    const third = backoffDelay(3, 500, 30_000);
    assert.ok(third >= 2000 && third <= 4000);
    const late = backoffDelay(20, 500, 30_000);
    assert.ok(late >= 15_000 && late <= 30_000);
  }
  const spread = new Set(Array.from({ length: 50 }, () => Math.round(backoffDelay(4, 500, 30_000))));
  assert.ok(spread.size > 10, "jittered, not one fixed delay");
});

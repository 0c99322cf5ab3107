// End-to-end proof of the demo page in a real browser: headless Chromium (the system's
// /usr/bin/chromium, driven by playwright-core) opens the page in two browser contexts (two
// users) against real gateway processes, and for the relay cases a real coturn.
//
// Run it through run.sh, which puts it in a network namespace that has only loopback: this
// script refuses to run anywhere else, so WebRTC can never send to another address.
//
// Every wait has a generous deadline so that a broken build fails instead of hanging; nothing
// asserts how long anything takes.

import { spawn } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import dgram from "node:dgram";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { chromium } from "playwright-core";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const gatewayBin = path.resolve(root, process.env.MATCHGATE_BIN ?? "target/debug/matchgate");
const chromiumPath = process.env.CHROMIUM ?? "/usr/bin/chromium";
const turnserverPath = process.env.TURNSERVER ?? "turnserver";
const artifacts = path.resolve(root, process.env.ARTIFACTS_DIR ?? "target/browser-artifacts");

/** Hang protection for every wait. */
const PATIENCE_MS = 60_000;
/** How long a call with wrong TURN credentials is watched for (it must not connect). */
const WRONG_SECRET_WATCH_MS = 20_000;

const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--use-fake-device-for-media-stream",
  "--use-fake-ui-for-media-stream",
  "--allow-loopback-in-peer-connection",
  "--disable-features=WebRtcHideLocalIpsWithMdns",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
  "--disable-quic",
  // The remote video has sound; without a click there it would not autoplay in a fresh
  // profile (a person has clicked Start, which counts).
  "--autoplay-policy=no-user-gesture-required",
];

// --- processes -------------------------------------------------------------------------------

const children = [];
const scratch = fs.mkdtempSync(path.join(os.tmpdir(), "matchgate-browser-"));

function startProcess(name, command, args) {
  const log = fs.openSync(path.join(artifacts, `${name}.log`), "w");
  const child = spawn(command, args, { stdio: ["ignore", log, log] });
  fs.closeSync(log);
  child.exited = new Promise((resolve) => child.on("exit", (code, signal) => resolve(code ?? signal)));
  child.on("error", (e) => console.error(`${name}: ${e.message}`));
  children.push(child);
  return child;
}

function stopAll() {
  for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
}

async function freePort(kind = "tcp") {
  if (kind === "udp") {
    const socket = dgram.createSocket("udp4");
    await new Promise((resolve) => socket.bind(0, "127.0.0.1", resolve));
    const { port } = socket.address();
    socket.close();
    return port;
  }
  const server = net.createServer();
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** Polls `probe` until it returns a truthy value, which it returns. */
async function until(what, probe, timeoutMs = PATIENCE_MS) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe().catch(() => undefined);
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** A gateway process in dev mode on a free loopback port; resolves once `/readyz` says so. */
async function startGateway(name, extraArgs = []) {
  const port = await freePort();
  const child = startProcess(name, gatewayBin, ["--listen", `127.0.0.1:${port}`, ...extraArgs]);
  const base = `http://127.0.0.1:${port}`;
  await until(`${name} to be ready`, async () => {
    if (child.exitCode !== null) return "exited";
    return (await fetch(`${base}/readyz`)).status === 200;
  }).then((ready) => {
    if (ready === "exited") throw new Error(`${name} exited (log: ${path.join(artifacts, `${name}.log`)})`);
  });
  return base;
}

/** A STUN binding request: coturn answers it once it listens. */
function stunAnswers(port) {
  return new Promise((resolve) => {
    const socket = dgram.createSocket("udp4");
    const request = Buffer.alloc(20);
    request.writeUInt16BE(0x0001, 0); // Binding request, no attributes.
    request.writeUInt32BE(0x2112a442, 4); // Magic cookie.
    randomBytes(12).copy(request, 8);
    const done = (answered) => {
      clearTimeout(timer);
      socket.close();
      resolve(answered);
    };
    const timer = setTimeout(() => done(false), 500);
    socket.on("message", (reply) => done(reply.subarray(8, 20).equals(request.subarray(8, 20))));
    socket.on("error", () => done(false));
    socket.send(request, port, "127.0.0.1");
  });
}

/** Debian's coturn with TURN REST credentials (`use-auth-secret`), loopback only. */
async function startTurn(secret) {
  const port = await freePort("udp");
  const child = startProcess("turnserver", turnserverPath, [
    "-n", // no configuration file: only these flags
    "--listening-ip=127.0.0.1",
    "--relay-ip=127.0.0.1",
    `--listening-port=${port}`,
    "--use-auth-secret",
    `--static-auth-secret=${secret}`,
    "--realm=matchgate.test",
    "--allow-loopback-peers",
    "--no-multicast-peers",
    "--no-cli",
    "--no-tls",
    "--no-dtls",
    "--min-port=49200",
    "--max-port=49299",
    `--db=${path.join(scratch, "turndb")}`,
    `--pidfile=${path.join(scratch, "turnserver.pid")}`,
    `--log-file=${path.join(artifacts, "turnserver-detail.log")}`,
    "--simple-log",
  ]);
  const ready = await until("turnserver to answer STUN", async () => child.exitCode !== null ? "exited" : stunAnswers(port));
  if (ready === "exited") throw new Error(`turnserver exited (log: ${path.join(artifacts, "turnserver.log")})`);
  return port;
}

// --- pages -----------------------------------------------------------------------------------

let browser;

/** One user: a browser context of its own with the demo page open. */
async function openPage(url, who) {
  const context = await browser.newContext({
    permissions: ["camera", "microphone"],
    viewport: { width: 1000, height: 760 },
  });
  // Test-side instrumentation (the page knows nothing of it): every ICE candidate error
  // (e.g. a TURN server refusing credentials with 401) of every peer connection.
  await context.addInitScript(() => {
    const Original = window.RTCPeerConnection;
    window.iceCandidateErrors = [];
    window.RTCPeerConnection = class extends Original {
      constructor(...args) {
        super(...args);
        this.addEventListener("icecandidateerror", (e) => window.iceCandidateErrors.push(e.errorCode));
      }
    };
  });
  const page = await context.newPage();
  page.who = who;
  page.problems = [];
  page.on("pageerror", (e) => page.problems.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error") page.problems.push(`console: ${m.text()}`);
  });
  await page.goto(url);
  return page;
}

/** Two users, both connected (dev mode: the page fetches its own token). */
async function openPair(url) {
  const pages = [];
  for (const who of ["a", "b"]) {
    const page = await openPage(url, who);
    pages.push(page);
    await waitForState(page, "idle");
  }
  return pages;
}

async function closePair(pages) {
  for (const page of pages) await page.context().close();
}

const demo = (page, expression) => page.evaluate(expression);

async function waitForState(page, state) {
  await page.waitForFunction((s) => window.matchgateDemo.state === s, state, { timeout: PATIENCE_MS });
}

/** Both click Start; resolves with the session id once both are in the same call. */
async function matchPair(pages) {
  for (const page of pages) await page.click("#start");
  for (const page of pages) await waitForState(page, "in_call");
  const [a, b] = await Promise.all(pages.map((p) => demo(p, () => window.matchgateDemo.sessionId)));
  check(a !== null && a === b, `both in the same session (${a}, ${b}; ${pages.map((p) => p.problems.join(", "))})`);
  return a;
}

async function waitConnected(page) {
  await page.waitForFunction(() => window.matchgateDemo.pc?.connectionState === "connected", null, {
    timeout: PATIENCE_MS,
  });
}

/** Bytes received over inbound RTP, per kind. */
function inboundBytes(page) {
  return demo(page, async () => {
    const bytes = { audio: 0, video: 0 };
    const stats = await window.matchgateDemo.pc.getStats();
    stats.forEach((r) => {
      if (r.type === "inbound-rtp") bytes[r.kind] += r.bytesReceived ?? 0;
    });
    return bytes;
  });
}

/** Media flows: inbound audio and video bytes grow between two samples. */
async function assertMediaFlows(page) {
  const first = await inboundBytes(page);
  await until(`inbound RTP bytes to grow on page ${page.who}`, async () => {
    const now = await inboundBytes(page);
    return now.audio > first.audio && now.video > first.video;
  });
  // The remote video shows frames (what the screenshot shows).
  await page.waitForFunction(() => document.getElementById("remote-video").videoWidth > 0, null, {
    timeout: PATIENCE_MS,
  });
}

/** Candidate types of the pair ICE selected: `{ local, remote }`. */
function selectedPair(page) {
  return demo(page, async () => {
    const stats = await window.matchgateDemo.pc.getStats();
    let pair = null;
    stats.forEach((r) => {
      if (r.type === "transport" && r.selectedCandidatePairId) pair = stats.get(r.selectedCandidatePairId);
    });
    if (pair === null) {
      stats.forEach((r) => {
        if (r.type === "candidate-pair" && r.nominated && r.state === "succeeded") pair = r;
      });
    }
    if (pair === null) return null;
    const local = stats.get(pair.localCandidateId);
    const remote = stats.get(pair.remoteCandidateId);
    return { local: local.candidateType, localAddress: local.address, remote: remote.candidateType };
  });
}

async function sendChat(from, to, text) {
  await from.fill("#chat-input", text);
  await from.press("#chat-input", "Enter");
  await to.waitForFunction((t) => window.matchgateDemo.lastChat === t, text, { timeout: PATIENCE_MS });
  const shown = await to.locator("#chat-log").innerText();
  check(shown.includes(text), `the chat line is shown on page ${to.who}`);
}

async function screenshots(pages, label) {
  for (const page of pages) {
    const file = path.join(artifacts, `${label}-${page.who}.png`);
    await page.screenshot({ path: file });
  }
}

function check(condition, what) {
  if (!condition) throw new Error(`expected: ${what}`);
}

/** No page errors and no console errors, except those matching `expected`. */
function noProblems(pages, expected = null) {
  for (const page of pages) {
    const problems = page.problems.filter((p) => expected === null || !expected.test(p));
    check(problems.length === 0, `no errors on page ${page.who}: ${problems.join("; ")}`);
  }
}

// --- the cases -------------------------------------------------------------------------------

const cases = [];
const test = (name, fn) => cases.push({ name, fn });

test("two pages are matched, call peer to peer over loopback, chat, and skip back to the queue", async () => {
  const gateway = await startGateway("gateway-p2p");
  const pages = await openPair(`${gateway}/`);
  try {
    await matchPair(pages);
    for (const page of pages) await waitConnected(page);
    for (const page of pages) await assertMediaFlows(page);
    const pair = await selectedPair(pages[0]);
    check(pair?.localAddress === "127.0.0.1", `host candidates on loopback (${JSON.stringify(pair)})`);
    await sendChat(pages[0], pages[1], "hello from a");
    await sendChat(pages[1], pages[0], "hi a, b here");
    await screenshots(pages, "p2p-call");
    await pages[0].click("#skip");
    for (const page of pages) await waitForState(page, "searching");
    await screenshots(pages, "p2p-after-skip");
    noProblems(pages);
  } finally {
    await closePair(pages);
  }
});

test("the same call through coturn with TURN REST credentials from the gateway (relay only)", async (turn) => {
  const gateway = await startGateway("gateway-turn", [
    "--turn-urls",
    `turn:127.0.0.1:${turn.port}?transport=udp`,
    "--turn-secret",
    turn.secret,
    "--resume-grace-ms",
    "3600000",
  ]);
  const pages = await openPair(`${gateway}/?relay=1`);
  try {
    await matchPair(pages);
    const servers = await demo(pages[0], () => window.matchgateDemo.pc.getConfiguration().iceServers);
    const turnServer = servers.find((s) => [s.urls].flat().some((u) => u.startsWith("turn:")));
    check(/^\d+:/.test(turnServer?.username ?? ""), `time-limited TURN credentials (${JSON.stringify(servers)})`);
    for (const page of pages) await waitConnected(page);
    for (const page of pages) await assertMediaFlows(page);
    for (const page of pages) {
      const pair = await selectedPair(page);
      check(pair?.local === "relay", `the selected pair's local candidate is a relay (${JSON.stringify(pair)})`);
    }
    await sendChat(pages[0], pages[1], "through the relay");
    await screenshots(pages, "relay-call");
    noProblems(pages);
    // Closing a page ends its call: with a grace period this long, nothing else would.
    await pages[0].close();
    await waitForState(pages[1], "idle");
  } finally {
    await closePair(pages);
  }
});

test("with a TURN secret coturn does not share, the relay-only call does not connect", async (turn) => {
  const gateway = await startGateway("gateway-wrong-secret", [
    "--turn-urls",
    `turn:127.0.0.1:${turn.port}?transport=udp`,
    "--turn-secret",
    `not-${turn.secret}`,
  ]);
  const pages = await openPair(`${gateway}/?relay=1`);
  try {
    await matchPair(pages);
    const deadline = Date.now() + WRONG_SECRET_WATCH_MS;
    const states = new Set();
    while (Date.now() < deadline && !states.has("failed")) {
      for (const page of pages) states.add(await demo(page, () => window.matchgateDemo.pc?.connectionState));
      check(!states.has("connected"), "no connection with refused credentials");
      await new Promise((resolve) => setTimeout(resolve, 250));
    }
    for (const page of pages) {
      const relays = await demo(page, async () => {
        let n = 0;
        (await window.matchgateDemo.pc.getStats()).forEach((r) => {
          if (r.type === "local-candidate" && r.candidateType === "relay") n += 1;
        });
        return n;
      });
      check(relays === 0, `coturn allocated no relay for page ${page.who} (${relays})`);
      // The browser did ask coturn, which refused the credentials.
      await until(`a 401 from coturn on page ${page.who}`, () => demo(page, () => window.iceCandidateErrors.includes(401)));
    }
  } finally {
    await closePair(pages);
  }
});

/** An HS256 token, as an app's backend would issue it. */
function hs256Token(secret, sub) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const body = `${part({ alg: "HS256", typ: "JWT" })}.${part({ sub, exp: Math.floor(Date.now() / 1000) + 600 })}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}

test("with a key and --demo the page asks for a token and two users with tokens are matched", async () => {
  const secret = randomBytes(32).toString("hex");
  const gateway = await startGateway("gateway-keyed-demo", ["--jwt-secret", secret, "--demo"]);
  const pages = [];
  try {
    for (const who of ["a", "b"]) {
      const page = await openPage(`${gateway}/`, who);
      pages.push(page);
      // No dev mode here: the page shows the token form instead of connecting.
      await page.locator("#token-form").waitFor({ state: "visible", timeout: PATIENCE_MS });
      check((await demo(page, () => window.matchgateDemo.state)) === "connecting", "not connected without a token");
      if (who === "a") {
        // A token the gateway refuses: the page asks again.
        await page.fill("#token-input", hs256Token(`not-${secret}`, "keyed-a"));
        await page.click("#token-form button");
        await page.locator("#token-form").waitFor({ state: "visible", timeout: PATIENCE_MS });
      }
      await page.fill("#token-input", hs256Token(secret, `keyed-${who}`));
      await page.click("#token-form button");
      await waitForState(page, "idle");
    }
    await matchPair(pages);
    for (const page of pages) await waitConnected(page);
    // The page's probe of the dev token endpoint, which does not exist here, and the refused
    // handshake.
    noProblems(pages, /status of 404|WebSocket connection to .* failed/);
  } finally {
    await closePair(pages);
  }
});

// --- the run ---------------------------------------------------------------------------------

async function main() {
  const interfaces = Object.keys(os.networkInterfaces());
  if (interfaces.some((name) => name !== "lo")) {
    console.error(`refusing to run WebRTC with network interfaces besides loopback (${interfaces}): use run.sh`);
    process.exit(2);
  }
  fs.rmSync(artifacts, { recursive: true, force: true });
  fs.mkdirSync(artifacts, { recursive: true });
  const turn = { secret: randomBytes(24).toString("hex") };
  let passed = 0;
  let failed = 0;
  try {
    turn.port = await startTurn(turn.secret);
    browser = await chromium.launch({ executablePath: chromiumPath, args: CHROMIUM_ARGS });
    // E2E_ONLY=<part of a name> runs only the matching cases (while working on one).
    for (const { name, fn } of cases.filter((c) => c.name.includes(process.env.E2E_ONLY ?? ""))) {
      try {
        await fn(turn);
        passed += 1;
        console.log(`ok - ${name}`);
      } catch (e) {
        failed += 1;
        console.log(`not ok - ${name}\n  ${String(e.stack ?? e).split("\n").join("\n  ")}`);
      }
    }
  } catch (e) {
    failed += 1;
    console.log(`not ok - setup\n  ${e.stack ?? e}`);
  } finally {
    await browser?.close();
    stopAll();
    await Promise.all(children.map((c) => c.exited));
    fs.rmSync(scratch, { recursive: true, force: true });
  }
  console.log(`screenshots and logs: ${artifacts}`);
  console.log(`browser: ${passed} passed, ${failed} failed`);
  process.exit(failed === 0 ? 0 : 1);
}

main();

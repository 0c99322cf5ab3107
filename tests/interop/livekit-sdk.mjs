// Cross-checks matchgate's LiveKit tokens and webhooks with the official Node server SDK
// (livekit-server-sdk 2.19.x), installed by .ci/livekit-sdk.sh.
//
// The SDK is loaded from the folder in LIVEKIT_SDK_DIR (a folder whose node_modules holds
// livekit-server-sdk), so this file needs no package.json of its own.
//
//   node livekit-sdk.mjs verify-token <key> <secret> <token>
//       Verifies a token as the SDK's TokenVerifier does (HS256, iss = key, exp required,
//       nbf/exp with the SDK's default ~10 s clock tolerance) and prints its claims as one JSON
//       line. Exit 1 with a message on stderr when it is refused.
//
//   node livekit-sdk.mjs sign-webhook <key> <secret> <body-file>
//       Prints the Authorization value the LiveKit server sends with a webhook whose raw body
//       is the file's bytes: an AccessToken with sha256 = base64(SHA-256(body)), valid 5 min,
//       no "Bearer " prefix. Checked with the SDK's WebhookReceiver before it is printed.
//
// Exit codes: 0 ok, 1 refused / check failed, 2 usage or setup error.

import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

function fail(code, message) {
  process.stderr.write(`livekit-sdk.mjs: ${message}\n`);
  process.exit(code);
}

async function loadSdk() {
  const dir = process.env.LIVEKIT_SDK_DIR;
  if (!dir) {
    fail(2, 'LIVEKIT_SDK_DIR is not set (run .ci/livekit-sdk.sh to install the SDK)');
  }
  const require = createRequire(path.join(path.resolve(dir), 'package.json'));
  let entry;
  try {
    // The package ships ESM (dist/index.js) and CJS (dist/index.cjs); require.resolve picks
    // the CJS entry of its "exports", which import() loads just as well.
    entry = require.resolve('livekit-server-sdk');
  } catch (e) {
    fail(2, `livekit-server-sdk not found under ${dir}: ${e.message}`);
  }
  const mod = await import(pathToFileURL(entry).href);
  const sdk = mod.AccessToken ? mod : mod.default;
  for (const name of ['AccessToken', 'TokenVerifier', 'WebhookReceiver']) {
    if (typeof sdk?.[name] !== 'function') {
      fail(2, `${entry} does not export ${name}`);
    }
  }
  return sdk;
}

async function verifyToken(sdk, key, secret, token) {
  let claims;
  try {
    claims = await new sdk.TokenVerifier(key, secret).verify(token);
  } catch (e) {
    fail(1, `token refused by TokenVerifier: ${e.code ?? e.name}: ${e.message}`);
  }
  process.stdout.write(`${JSON.stringify(claims)}\n`);
}

async function signWebhook(sdk, key, secret, bodyFile) {
  let raw;
  try {
    raw = readFileSync(bodyFile);
  } catch (e) {
    fail(2, `cannot read the body file: ${e.message}`);
  }
  const body = raw.toString('utf8');
  if (!Buffer.from(body, 'utf8').equals(raw)) {
    fail(2, `${bodyFile} is not valid UTF-8`);
  }
  const at = new sdk.AccessToken(key, secret, { ttl: '5m' });
  at.sha256 = createHash('sha256').update(raw).digest('base64');
  const auth = await at.toJwt();
  try {
    await new sdk.WebhookReceiver(key, secret).receive(body, auth);
  } catch (e) {
    fail(1, `the SDK's WebhookReceiver refused the signed body: ${e.message}`);
  }
  process.stdout.write(`${auth}\n`);
}

const [command, ...args] = process.argv.slice(2);
const usage =
  'usage: node livekit-sdk.mjs verify-token <key> <secret> <token>\n' +
  '       node livekit-sdk.mjs sign-webhook <key> <secret> <body-file>';
if (!['verify-token', 'sign-webhook'].includes(command) || args.length !== 3) {
  fail(2, usage);
}
const sdk = await loadSdk();
if (command === 'verify-token') {
  await verifyToken(sdk, ...args);
} else {
  await signWebhook(sdk, ...args);
}

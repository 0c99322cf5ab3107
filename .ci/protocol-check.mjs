// Checks the machine-readable protocol contract in protocol/:
//
//   1. protocol/asyncapi.yaml parses with the official AsyncAPI parser (file $refs resolved);
//      any diagnostic of severity error fails. Every schema file is tied to the channel, every
//      client message is sent and every server message received by some operation, and each
//      message's `name` equals its payload's `type`.
//   2. Every schema in protocol/schemas/{client,server}/ compiles with Ajv (draft 2020-12,
//      strict mode) and follows the house rules (self-contained, `$id`, `type` const, ...).
//   3. Every example in protocol/examples/{client,server}/ validates against the schema of
//      its `type`, and every schema has at least one example.
//
// Dependencies (@asyncapi/parser v3, ajv v8) are resolved with require(), so NODE_PATH works:
//   NODE_PATH=/path/to/node_modules node .ci/protocol-check.mjs
// .ci/protocol-check.sh installs them into a temporary folder and does exactly that.
// The last line of output is always `protocol: N passed, M failed`; the exit code is 0 only
// when nothing failed.

import { readdirSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const require = createRequire(import.meta.url);
const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const protocolDir = join(root, 'protocol');
const SIDES = ['client', 'server'];
const DRAFT_2020_12 = 'https://json-schema.org/draft/2020-12/schema';
const ID_BASE = 'https://matchgate.dev/protocol/v1';

let passed = 0;
let failed = 0;

/** Records one check: `problems` empty means it passed. */
function check(name, problems) {
  if (problems.length === 0) {
    passed += 1;
    console.log(`ok   ${name}`);
  } else {
    failed += 1;
    console.log(`FAIL ${name}`);
    for (const p of problems) console.log(`       ${p}`);
  }
}

/** Runs `fn`, turning an exception into a failed check. */
async function guarded(name, fn) {
  try {
    await fn();
  } catch (e) {
    check(name, [`${e && e.stack ? e.stack : e}`]);
  }
}

function rel(path) {
  return relative(root, path);
}

function jsonFiles(dir) {
  let names;
  try {
    names = readdirSync(dir);
  } catch {
    return [];
  }
  return names.filter((n) => n.endsWith('.json')).sort();
}

function readJson(path) {
  return JSON.parse(readFileSync(path, 'utf8'));
}

/** Every `$ref` value anywhere in `value`. */
function refsIn(value, out = []) {
  if (Array.isArray(value)) {
    for (const v of value) refsIn(v, out);
  } else if (value && typeof value === 'object') {
    for (const [k, v] of Object.entries(value)) {
      if (k === '$ref' && typeof v === 'string') out.push(v);
      else refsIn(v, out);
    }
  }
  return out;
}

function formatAjvErrors(errors) {
  return (errors || []).map(
    (e) => `${e.instancePath || '/'} ${e.message}${e.params ? ` ${JSON.stringify(e.params)}` : ''}`,
  );
}

// ---------------------------------------------------------------------------------------------
// Schemas

/** side -> type -> { file, schema, validate } */
const schemas = { client: new Map(), server: new Map() };

function loadSchemas(ajv) {
  for (const side of SIDES) {
    const dir = join(protocolDir, 'schemas', side);
    const files = jsonFiles(dir);
    if (files.length === 0) check(`schemas/${side}/ is not empty`, [`no schema in ${rel(dir)}`]);
    for (const file of files) {
      const path = join(dir, file);
      const type = file.slice(0, -'.json'.length);
      const problems = [];
      let schema;
      try {
        schema = readJson(path);
      } catch (e) {
        check(`schema ${side}/${file}`, [`not valid JSON: ${e.message}`]);
        continue;
      }
      if (schema.$schema !== DRAFT_2020_12) problems.push(`$schema must be ${DRAFT_2020_12}`);
      const id = `${ID_BASE}/${side}/${file}`;
      if (schema.$id !== id) problems.push(`$id must be ${id}, is ${JSON.stringify(schema.$id)}`);
      for (const key of ['title', 'description']) {
        if (typeof schema[key] !== 'string' || schema[key].trim() === '') {
          problems.push(`missing ${key}`);
        }
      }
      if (schema.type !== 'object') problems.push('top-level "type" must be "object"');
      if (schema.properties?.type?.const !== type) {
        problems.push(`properties.type must be {"const": "${type}"} (from the file name)`);
      }
      if (!Array.isArray(schema.required) || !schema.required.includes('type')) {
        problems.push('"type" must be required');
      }
      const external = refsIn(schema).filter((r) => !r.startsWith('#'));
      if (external.length > 0) {
        problems.push(`must be self-contained, found $ref ${external.join(', ')}`);
      }
      if (side === 'server' && schema.additionalProperties !== false) {
        problems.push('server schemas must set "additionalProperties": false');
      }
      if (side === 'client' && schema.additionalProperties === false) {
        problems.push('client schemas must allow unknown fields (the gateway ignores them)');
      }
      let validate;
      try {
        validate = ajv.compile(schema);
      } catch (e) {
        problems.push(`does not compile (Ajv 2020, strict): ${e.message}`);
      }
      schemas[side].set(type, { file: `${side}/${file}`, schema, validate, examples: 0, valid: [], problems });
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Examples

function checkExamples() {
  for (const side of SIDES) {
    const dir = join(protocolDir, 'examples', side);
    for (const file of jsonFiles(dir)) {
      const name = `example ${side}/${file}`;
      const problems = [];
      let frame;
      try {
        frame = readJson(join(dir, file));
      } catch (e) {
        check(name, [`not valid JSON: ${e.message}`]);
        continue;
      }
      const fileType = file.split('.')[0];
      if (!frame || typeof frame !== 'object' || Array.isArray(frame)) {
        check(name, ['a frame must be a JSON object']);
        continue;
      }
      if (frame.type !== fileType) {
        problems.push(`file name says type "${fileType}", frame says ${JSON.stringify(frame.type)}`);
      }
      const entry = schemas[side].get(frame.type);
      if (!entry) {
        problems.push(`no schema protocol/schemas/${side}/${frame.type}.json`);
      } else if (!entry.validate) {
        entry.examples += 1;
        problems.push(`schema ${entry.file} did not compile`);
      } else {
        entry.examples += 1;
        if (!entry.validate(frame)) {
          problems.push(...formatAjvErrors(entry.validate.errors).map((e) => `invalid: ${e}`));
        } else {
          entry.valid.push(frame);
        }
      }
      check(name, problems);
    }
  }
}

/**
 * Mutations of each valid example that the schema must refuse: every declared `required`
 * field is really enforced, the `type` const and the `ref` length hold, and server schemas
 * let no undocumented field through.
 */
function mustReject(side, entry) {
  const problems = [];
  const reject = (what, frame) => {
    if (entry.validate(frame)) problems.push(`accepts a frame ${what}: ${JSON.stringify(frame)}`);
  };
  for (const frame of entry.valid) {
    for (const field of entry.schema.required ?? []) {
      const { [field]: _, ...rest } = frame;
      reject(`without required "${field}"`, rest);
    }
    reject('with another type', { ...frame, type: `not_${frame.type}` });
    if (entry.schema.properties?.ref) reject('with a 65-character ref', { ...frame, ref: 'r'.repeat(65) });
    if (side === 'server') reject('with an undocumented field', { ...frame, undocumented_field: 1 });
  }
  return problems;
}

/** Reports each schema once, after its examples were counted. */
function reportSchemas() {
  for (const side of SIDES) {
    for (const [type, entry] of schemas[side]) {
      const problems = [...entry.problems];
      if (entry.examples === 0) {
        problems.push(`no example: add protocol/examples/${side}/${type}.json (or ${type}.<variant>.json)`);
      }
      if (entry.validate) problems.push(...mustReject(side, entry));
      check(`schema ${entry.file}`, problems);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// AsyncAPI

async function checkAsyncApi() {
  const { Parser, fromFile, DiagnosticSeverity } = require('@asyncapi/parser');
  const path = join(protocolDir, 'asyncapi.yaml');
  const parser = new Parser();
  const { document, diagnostics } = await fromFile(parser, path).parse();

  const severityName = ['error', 'warning', 'info', 'hint'];
  const errors = [];
  for (const d of diagnostics) {
    const where = d.path && d.path.length ? ` at ${d.path.join('.')}` : '';
    const src = d.source && d.source !== path ? ` (${rel(d.source)})` : '';
    const line = `${severityName[d.severity] ?? d.severity} ${d.code}: ${d.message}${where}${src}`;
    if (d.severity === DiagnosticSeverity.Error) errors.push(line);
    else console.log(`     ${line}`);
  }
  if (!document && errors.length === 0) errors.push('the parser returned no document');
  check('asyncapi.yaml parses without errors', errors);
  if (!document) return;

  // Tie the document to the schema folder.
  const problems = [];
  const referenced = { client: new Set(), server: new Set() };
  for (const message of document.messages().all()) {
    const payload = message.payload()?.json();
    const id = payload?.$id;
    const m = typeof id === 'string' && id.match(/\/v1\/(client|server)\/([a-z_]+)\.json$/);
    if (!m) {
      problems.push(`message ${message.id()}: payload is not one of protocol/schemas/*/*.json`);
      continue;
    }
    const [, side, type] = m;
    referenced[side].add(type);
    if (message.name() !== type) {
      problems.push(`message ${message.id()}: name "${message.name()}" but payload type "${type}"`);
    }
    const entry = schemas[side].get(type);
    if (entry && JSON.stringify(stripParserKeys(payload)) !== JSON.stringify(entry.schema)) {
      problems.push(`message ${message.id()}: resolved payload differs from ${entry.file}`);
    }
  }
  for (const side of SIDES) {
    for (const type of schemas[side].keys()) {
      if (!referenced[side].has(type)) problems.push(`schemas/${side}/${type}.json is not used by any message`);
    }
  }
  const covered = { send: new Set(), receive: new Set() };
  for (const op of document.operations().all()) {
    for (const message of op.messages().all()) {
      const id = message.payload()?.json()?.$id ?? '';
      covered[op.action()]?.add(id);
    }
  }
  for (const [side, action] of [['client', 'send'], ['server', 'receive']]) {
    for (const type of schemas[side].keys()) {
      if (!covered[action].has(`${ID_BASE}/${side}/${type}.json`)) {
        problems.push(`no "${action}" operation carries ${side} message "${type}"`);
      }
    }
  }
  check('asyncapi.yaml covers every schema (client: send, server: receive)', problems);
}

/** The parser annotates schemas with `x-parser-*` keys; drop them before comparing. */
function stripParserKeys(value) {
  if (Array.isArray(value)) return value.map(stripParserKeys);
  if (value && typeof value === 'object') {
    return Object.fromEntries(
      Object.entries(value)
        .filter(([k]) => !k.startsWith('x-parser-'))
        .map(([k, v]) => [k, stripParserKeys(v)]),
    );
  }
  return value;
}

// ---------------------------------------------------------------------------------------------

async function main() {
  const missing = ['ajv/dist/2020', '@asyncapi/parser'].filter((m) => {
    try {
      require.resolve(m);
      return false;
    } catch {
      return true;
    }
  });
  if (missing.length > 0) {
    check('dependencies', [
      `cannot load ${missing.join(', ')}: run .ci/protocol-check.sh, or point NODE_PATH at a node_modules holding @asyncapi/parser@3 and ajv@8`,
    ]);
  } else {
    await guarded('load the schemas', () => {
      const Ajv2020 = require('ajv/dist/2020');
      // strict mode: unknown keywords, ignored keywords, missing types etc. are errors.
      // allowUnionTypes: `"type": ["integer", "null"]` is how nullable fields are written.
      const ajv = new Ajv2020({ strict: true, allErrors: true, allowUnionTypes: true });
      loadSchemas(ajv);
    });
    await guarded('examples', checkExamples);
    reportSchemas();
    await guarded('asyncapi.yaml', checkAsyncApi);
  }
  console.log(`protocol: ${passed} passed, ${failed} failed`);
  process.exitCode = failed === 0 && passed > 0 ? 0 : 1;
}

main().catch((e) => {
  console.error(e);
  console.log(`protocol: ${passed} passed, ${failed + 1} failed`);
  process.exitCode = 1;
});

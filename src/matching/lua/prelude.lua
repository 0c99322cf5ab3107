#!lua name=matchgate_@VERSION@
-- matchgate's matching engine in Redis, a function library: every operation is one step of a
-- call of the function `matchgate_<version>` (FCALL), so each is atomic however many gateway
-- instances race. It mirrors matching/memory.rs rule for rule. A library rather than a script: its
-- helpers are created once at load, not on every call.
--
-- The library is assembled from the files of src/matching/lua/ in the order redis.rs lists
-- (`LIBRARY`): this prelude (call-scoped state, replies, ids), the key layout, users' hashes
-- (read once and written once per call, users.lua), then one file per concern (events, pools, conduct, p2p media, sessions, matching, undoing and ending
-- sessions, connections), then one file per operation under ops/, and dispatch.lua last,
-- which registers the function. A file may use what the files before it define. The gateway
-- replaces @VERSION@ with a hash of the whole assembled text, so that during a rolling
-- upgrade old and new gateways each call their own version side by side.
--
-- FCALL matchgate_<version> 1 <route key> <settings> <operation> <arguments> [<operation>
--       <arguments> ...]
--   route key: any key with the deployment's hash tag (routes the call in Redis Cluster;
--              every key the library touches shares that tag, so a call touches one slot).
--   settings:  JSON object, the same text in every call of an instance (decoded once per
--              distinct text, see dispatch.lua): key and channel prefixes, history and grace,
--              the media mode and the rules.
--   then a batch of operations, run one after the other, each its own step as if it were
--   called alone (the gateway's group commit: what one instance asks while its previous call
--   is in flight goes in its next call):
--   operation: the name of an entry of OPS (one file under ops/ each).
--   arguments: JSON object, the operation's named arguments: `entropy` (random, for ids),
--              `now_ms` (optional: replaces Redis TIME, a clock for tests), and its own.
-- Returns [published, [reply, ...]]: how many pub/sub messages the call sent (one per
-- instance at most, see `publish_all` in events.lua), and one reply per operation, in order,
-- each a JSON object: {"error": {"code", "message", "retry_after_ms"}} or {"done":
-- {"outcome": {...}, "reply": {...}}} with the outcome fields waits (ms), started (sessions
-- that went live: session_id, users, pools, started_at_ms), closed (live sessions ended:
-- session_id, users, started_at_ms, ended_at_ms, ended_by (absent: neither member), reason),
-- changed_pools, held, pending, ended_sessions, timers, and the operation's own reply. An
-- operation refused with an error leaves things as it would alone (unchanged but for the
-- conduct bookkeeping some refusals make, see conduct.lua) and the batch runs on; one that
-- fails at run time (a bug) answers "internal" and the others still run, as separate calls
-- would. The batch as a whole is atomic: no other call runs in between.

-- Set at the start of every call (the library's functions are created once, at load), and A,
-- NOW and USER again for each operation of the batch.
-- S: the settings; R: their rules; A: the operation's arguments; P: the key root (see
-- keys.lua); NOW: the time of the operation in ms; USER: the user (or instance) it is about.
local S, R, A, P, NOW, USER
-- The channel prefix (frames for instance i go to CHANNELS .. i), and the media mode:
-- MEDIA_PENDING > 0 (LiveKit: how long a paired session may wait for its room) or P2P_KEY
-- (p2p: the key of this instance's ICE servers, and ICE, what it holds; see p2p.lua).
local CHANNELS, MEDIA_PENDING, P2P_KEY, ICE
-- The outcome the operation collects, the user whose request it is, and that request's `ref`
-- (stamped on the first event to that user).
local out, actor, ref
-- Ids made in this operation so far (each id hashes its entropy with this counter).
local id_counter

-- The operations, by name: one file under ops/ each (see dispatch.lua).
local OPS = {}

local function fail(code, message, retry_after_ms)
  return cjson.encode({ error = { code = code, message = message, retry_after_ms = retry_after_ms } })
end

-- The successful reply: the operation's own fields (if any) and what the call collected.
local function result(reply)
  return cjson.encode({ done = { outcome = out, reply = reply or {} } })
end

local function null_or(v)
  if v == nil then return cjson.null end
  return v
end

local function split(s, sep)
  local t = {}
  if not s or s == '' then return t end
  for v in string.gmatch(s, '[^' .. sep .. ']+') do table.insert(t, v) end
  return t
end

-- The table under `key` in `tables`, made on first use, when `key` is also appended to `order`:
-- what a call collects per key (an instance, a hash), kept in the order the keys first came.
local function entry_of(tables, order, key)
  local t = tables[key]
  if not t then
    t = {}
    tables[key] = t
    table.insert(order, key)
  end
  return t
end

local function bytes_of_hex(user_hash)
  return (string.gsub(user_hash, '..', function(x) return string.char(tonumber(x, 16)) end))
end

local BASE64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'
local BASE64_URL = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_'

-- Base64 (RFC 4648) of the bytes s in `alphabet`, padded with '=' when `pad`.
local function base64(s, alphabet, pad)
  local t = {}
  for i = 1, #s, 3 do
    local a, b, c = string.byte(s, i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local sextets = { math.floor(n / 262144), math.floor(n / 4096) % 64, math.floor(n / 64) % 64, n % 64 }
    for j = 1, 4 do
      if (j == 3 and not b) or (j == 4 and not c) then
        if pad then t[#t + 1] = '=' end
      else
        t[#t + 1] = string.sub(alphabet, sextets[j] + 1, sextets[j] + 1)
      end
    end
  end
  return table.concat(t)
end

-- The base64url digit of a 6-bit value.
local function base64_url_digit(n) return string.sub(BASE64_URL, n + 1, n + 1) end

-- The first `bytes` bytes of the hex string `hex` in URL-safe base64 without padding, read
-- straight off the hex digits (3 hex digits are 2 base64 digits, and the bits left at the end
-- are zero-padded to a digit, as base64 does): base64(bytes_of_hex(hex)) at a fraction of its
-- cost. Ids are made with every match, and making them through bytes was about a sixth of a
-- match's Redis instructions.
local function base64_url_of_hex(hex, bytes)
  local digit = base64_url_digit
  local t, last = {}, bytes * 2
  local i = 1
  while i + 2 <= last do
    local n = tonumber(string.sub(hex, i, i + 2), 16)
    t[#t + 1] = digit(math.floor(n / 64))
    t[#t + 1] = digit(n % 64)
    i = i + 3
  end
  if last - i == 0 then
    -- One hex digit left: 4 bits.
    t[#t + 1] = digit(tonumber(string.sub(hex, i, i), 16) * 4)
  elseif last - i == 1 then
    -- Two: 8 bits.
    local n = tonumber(string.sub(hex, i, i + 1), 16)
    t[#t + 1] = digit(math.floor(n / 4))
    t[#t + 1] = digit(n % 4 * 16)
  end
  return table.concat(t)
end

-- A new id: `prefix` and `bytes` (at most 20) unguessable bytes in URL-safe base64 without
-- padding, the format of ids::random_id, so that both engines make the same ids (a session
-- id is "s_" and 22 characters, a peer handle "p_" and 12). In a partitioned deployment
-- (S.partition set, see matching/partitioned.rs) the first character of a session id is the
-- partition's number in that alphabet: media events and moderators name a session by its id
-- alone, and the gateway finds its partition from it.
local function new_id(prefix, bytes)
  id_counter = id_counter + 1
  local id = base64_url_of_hex(redis.sha1hex(A.entropy .. ':' .. id_counter), bytes)
  if prefix == 's_' and S.partition then
    id = string.sub(BASE64_URL, S.partition + 1, S.partition + 1) .. string.sub(id, 2)
  end
  return prefix .. id
end

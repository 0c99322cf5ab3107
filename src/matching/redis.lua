#!lua name=matchgate_@VERSION@
-- matchgate's matching engine in Redis, a function library: every operation is one call of
-- the function `matchgate_<version>` (FCALL), so each is atomic however many gateway instances
-- race. It mirrors matching/memory.rs rule for rule. A library rather than a script: its
-- helpers are created once at load, not on every call. The gateway replaces @VERSION@ with a
-- hash of this text, so that during a rolling upgrade old and new gateways each call their own
-- version side by side.
--
-- KEYS[1]: any key with the deployment's hash tag (routes the call in Redis Cluster; every key
--          below shares that tag, so a call touches one slot). KEYS[2], tests only:
--          '<prefix>:test_now:<ms>', the time to use instead of TIME (see src/clock.rs).
-- ARGV: 1 key prefix (e.g. "{mg}"), 2 operation, 3 requeue peer on skip ("1"/"0"),
--       4 history length, 5 history ttl ms, 6 grace ms, 7 channel prefix, 8 entropy (random,
--       for ids), 9 user (or instance for instance-level operations), 10 media mode:
--       "livekit <ms>" (a session waits for its room, at most that long) or "p2p <instance>"
--       (sessions start live with the ICE servers of P:p2p:<instance>, see `load_p2p`),
--       11 the rules (see `read_rules`), 12.. operation arguments.
-- Returns a JSON object: {"error": ..} or the operation's result plus the outcome fields
-- waits (ms), ended (reasons), changed (pools), held, published, pending, ended_sessions,
-- timers.
--
-- Key layout (P = prefix):
--   P:u:<user>      hash: conn inst away state pool wider prefs rkeys rprefs ticket since
--                         told_pos told_est fb sid avoid epoch seq hb (blocked anyone);
--                         state is idle, queued,
--                         pending (paired, not live yet; the queue fields are kept) or session
--   P:log:<user>    list of "<seq> <ms> <frame>", newest last, bounded, expires
--   P:pool:<pool>   zset of connected waiting users by ticket (FIFO): the only users a match
--                   attempt visits; a user whose search widened is also listed, with the same
--                   ticket, in the pools in its `wider` field
--   P:held:<pool>   zset of waiting users whose connection dropped (held for a resume), by
--                   ticket, listed like P:pool: they keep their place and count in positions,
--                   and move back to P:pool when they reattach
--   P:s:<session>   hash: u1 u2 (u1 offers) h1 h2 (their handles) created phase (proposed,
--                   pending or live) a1 a2 (accepted) live (ms it went live)
--   P:met:<user>    list of "<session>\t<ms>\t<peer>", newest first: sessions that went live;
--                   kept while the user's hash exists, forgotten a while after it goes
--   P:blk:<user>    set of the users this user blocked (at most max_blocks)
--   P:blkt:<user>   zset of the same users by when they were blocked, to drop the oldest; both
--                   persist while the user's hash exists and expire block_ttl after it goes
--   P:cd:<user>     hash: qs (quick skip times) lvl until (cooldown) qe (when the user last
--                   ended a session quickly); expires
--   P:enqw:<user>   hash: start n: enqueues in the one-minute window from start; expires
--   P:sessions      zset session -> ms matched (media mode only: what the room sweep checks)
--   P:pending       zset session -> ms by which a paired session must be live, else undone
--   P:seen:<event>  a media event id acted on (de-duplication), expires
--   P:lease:<name>  the instance that runs the periodic job <name>, expires
--   P:ticket        counter; P:stat hash: queued sessions
--   P:waits         hash: smoothed wait in ms per pool, and over all pools under "*"
--   P:instances     zset instance -> last heartbeat ms; P:iu:<inst> set of users attached there
--   P:dead          set of dead instances whose users still need cleanup
--   P:last_tick     when any instance last ticked; P:judge_after: no deaths declared before
--                   this (set after a pause that affected everybody)
--   P:exp           zset "<user>\n<conn>" -> ms when the held state expires
--   P:epoch         random id of this dataset: a new one means Redis lost everything
--   P:p2p:<inst>    hash: secret (TURN, "" without), ttl (of TURN credentials, s), stun (the
--                   STUN entry's JSON, "" without), turn (the TURN urls' JSON, "" without):
--                   what the matches of instance <inst> list in media mode p2p; written by
--                   that instance (operation p2p_config), expires
-- Frames go out with PUBLISH on <channel prefix><instance>: "F<user>\n<seq>\n<frame>" for a
-- frame (seq 0: none), "K<user>\n<conn>" to close a connection replaced from elsewhere.
-- Relayed messages (signal, chat) go out the same way, without seq and without a log entry.

-- Set at the start of every call (the library's functions are created once, at load).
local ARGV, P, OP, REQUEUE_PEER, HISTORY_LEN, HISTORY_TTL, GRACE, CH, ENTROPY, USER, NOW
local MEDIA_PENDING, R, RULES_TEXT
-- Media mode p2p: the key of this instance's ICE servers, and what it holds (see `load_p2p`).
local P2P_KEY, ICE
local out, actor, ref, id_counter

-- The rules, one comma-separated string: anti-repeat window ms, fallback ms, quick skip ms,
-- skip limit, skip window ms, enqueues per minute, accept timeout ms (0: off), decline to
-- tail (1/0), relax after ms, the cooldowns in ms separated by ";", blocks kept per user,
-- block ttl ms.
local function read_rules(s)
  local f = {}
  for v in string.gmatch(s, '[^,]+') do table.insert(f, v) end
  local cds = {}
  for v in string.gmatch(f[10], '[^;]+') do table.insert(cds, tonumber(v)) end
  return { window = tonumber(f[1]), fallback = tonumber(f[2]), quick = tonumber(f[3]),
    limit = tonumber(f[4]), skip_window = tonumber(f[5]), enq = tonumber(f[6]),
    accept = tonumber(f[7]), tail = f[8] == '1', relax = tonumber(f[9]), cooldowns = cds,
    max_blocks = tonumber(f[11]), block_ttl = tonumber(f[12]) }
end

-- The i-th operation argument.
local function arg(i) return ARGV[11 + i] end

local function ukey(u) return P .. ':u:' .. u end
local function skey(s) return P .. ':s:' .. s end
local function zkey(pk) return P .. ':pool:' .. pk end
local function hkey(pk) return P .. ':held:' .. pk end

local function new_id(prefix, len)
  id_counter = id_counter + 1
  return prefix .. string.sub(redis.sha1hex(ENTROPY .. ':' .. id_counter), 1, len)
end

local function fail(code, message, retry_after_ms)
  return cjson.encode({ error = code, message = message, retry_after_ms = retry_after_ms })
end

local function publish(inst, payload)
  redis.call('PUBLISH', CH .. inst, payload)
  out.published = out.published + 1
end

-- Appends an event to the user's log (if it carries a seq) and sends it to their instance.
-- `raw`, if given, is one more member ("name":<JSON>) spliced into the frame as it is.
local function emit(u, ev, raw)
  local h = ukey(u)
  local inst, away = unpack(redis.call('HMGET', h, 'inst', 'away'))
  if not inst then return end
  if ref and u == actor then
    ev['ref'] = ref
    ref = nil
  end
  local seq = 0
  if ev['type'] ~= 'queue_update' and ev['type'] ~= 'error' then
    seq = redis.call('HINCRBY', h, 'seq', 1)
    ev['seq'] = seq
  end
  local text = cjson.encode(ev)
  if raw then text = string.sub(text, 1, -2) .. ',' .. raw .. '}' end
  if seq > 0 then
    local lk = P .. ':log:' .. u
    -- Trimmed in batches: the log may briefly hold a few more than HISTORY_LEN entries.
    if redis.call('RPUSH', lk, seq .. ' ' .. NOW .. ' ' .. text) > HISTORY_LEN + 16 then
      redis.call('LTRIM', lk, -HISTORY_LEN, -1)
    end
    redis.call('PEXPIRE', lk, HISTORY_TTL)
  end
  if away ~= '1' then
    publish(inst, 'F' .. u .. '\n' .. seq .. '\n' .. text)
  end
end

local function ewma(prev, sample)
  if not prev then return sample end
  prev = tonumber(prev)
  return prev + 0.2 * (sample - prev)
end

local function estimate(pk, position)
  local pool_wait, all_wait = unpack(redis.call('HMGET', P .. ':waits', pk, '*'))
  local w = pool_wait or all_wait
  if not w then return nil end
  local ms = tonumber(w) * (position + 1)
  return math.floor(ms / 100 + 0.5) * 100
end

local function null_or(v)
  if v == nil then return cjson.null end
  return v
end

local function add_changed(pk)
  for _, p in ipairs(out.changed) do
    if p == pk then return end
  end
  table.insert(out.changed, pk)
end

-- Drops the wait history of a pool nobody waits in, or reports that positions changed.
local function pool_changed(pk)
  if redis.call('ZCARD', zkey(pk)) == 0 and redis.call('ZCARD', hkey(pk)) == 0 then
    redis.call('HDEL', P .. ':waits', pk)
  else
    add_changed(pk)
  end
end

local function split(s, sep)
  local t = {}
  if not s or s == '' then return t end
  for v in string.gmatch(s, '[^' .. sep .. ']+') do table.insert(t, v) end
  return t
end

local function timer(delay, u, kind, a)
  table.insert(out.timers, { math.max(delay, 0), u, kind, tostring(a) })
end

-- Every pool a waiting user is listed in.
local function pools_of(pk, wider)
  local t = { pk }
  for _, k in ipairs(split(wider, '\n')) do table.insert(t, k) end
  return t
end

-- How many wait in pool pk ahead of `ticket` (all of them when nil), connected or not.
local function ahead(pk, ticket)
  local upto = '+inf'
  if ticket then upto = '(' .. ticket end
  return redis.call('ZCOUNT', zkey(pk), '-inf', upto) + redis.call('ZCOUNT', hkey(pk), '-inf', upto)
end

-- Lists u at `ticket` in pool k: among the connected waiters, or the away ones.
local function list(u, k, ticket, away)
  if away then
    redis.call('ZADD', hkey(k), ticket, u)
  else
    redis.call('ZADD', zkey(k), ticket, u)
  end
end

-- Moves waiting u between the connected and the away lists of its pools (its connection
-- dropped, or it came back).
local function set_away(u, away)
  local state, pk, wider, ticket = unpack(redis.call('HMGET', ukey(u), 'state', 'pool', 'wider', 'ticket'))
  if state ~= 'queued' then return end
  for _, k in ipairs(pools_of(pk, wider)) do
    if away then redis.call('ZREM', zkey(k), u) else redis.call('ZREM', hkey(k), u) end
    list(u, k, ticket, away)
  end
end

-- Takes a waiting user out of every pool it is listed in.
local function take_waiting(u)
  local h = ukey(u)
  local state, pk, since, ticket, wider = unpack(redis.call('HMGET', h, 'state', 'pool', 'since', 'ticket', 'wider'))
  if state ~= 'queued' then return nil end
  local pools = pools_of(pk, wider)
  for _, k in ipairs(pools) do
    redis.call('ZREM', zkey(k), u)
    redis.call('ZREM', hkey(k), u)
  end
  -- Only the state changes: the queue fields are read only while the state is `queued` or
  -- `pending`.
  redis.call('HSET', h, 'state', 'idle')
  redis.call('HINCRBY', P .. ':stat', 'queued', -1)
  -- The caller reports the pools as changed (`pools_changed`) once it is done with them.
  return { pk = pk, since = tonumber(since), ticket = tonumber(ticket), pools = pools }
end

local function pools_changed(w)
  for _, k in ipairs(w.pools) do pool_changed(k) end
end

-- Puts a paired user back at its old place (its ticket) in every pool it was listed in.
local function restore(u)
  local h = ukey(u)
  local pk, ticket, wider, away = unpack(redis.call('HMGET', h, 'pool', 'ticket', 'wider', 'away'))
  for _, k in ipairs(pools_of(pk, wider)) do
    list(u, k, ticket, away == '1')
    add_changed(k)
  end
  redis.call('HSET', h, 'state', 'queued')
  redis.call('HINCRBY', P .. ':stat', 'queued', 1)
end

-- Takes a waiting user out of the queue and tells them why.
local function dequeue(u, reason)
  local w = take_waiting(u)
  if w then
    pools_changed(w)
    emit(u, { type = 'dequeued', reason = reason })
  end
end

local function session_of(u)
  local state, sid = unpack(redis.call('HMGET', ukey(u), 'state', 'sid'))
  if state ~= 'session' then return nil end
  local u1, u2 = unpack(redis.call('HMGET', skey(sid), 'u1', 'u2'))
  if not u1 then return nil end
  if u1 == u then return sid, u2 end
  return sid, u1
end

-- Whether a (whose hash says `a_blocks`, "1" when a ever blocked anyone) or b blocked the
-- other. The flags spare the set lookups for the many users who never block.
local function blocked(a, a_blocks, b, b_blocks)
  return (a_blocks == '1' and redis.call('SISMEMBER', P .. ':blk:' .. a, b) == 1)
    or (b_blocks == '1' and redis.call('SISMEMBER', P .. ':blk:' .. b, a) == 1)
end

-- The sessions u had, newest first: { session, ms, peer } each.
local function met_list(u)
  local t = {}
  for _, e in ipairs(redis.call('LRANGE', P .. ':met:' .. u, 0, -1)) do
    local sid, ms, peer = string.match(e, '^([^\t]*)\t(%d+)\t(.*)$')
    table.insert(t, { sid, tonumber(ms), peer })
  end
  return t
end

-- When u last met each peer within the anti-repeat window.
local function met_within(u)
  local t = {}
  if R.window == 0 then return t end
  for _, m in ipairs(met_list(u)) do
    if NOW - m[2] < R.window and not t[m[3]] then t[m[3]] = m[2] end
  end
  return t
end

-- Media mode p2p: the ICE servers of this instance's matches, or false when the instance must
-- write them first (at its start, after they expired, or after Redis lost its data).
local function load_p2p()
  local secret, ttl, stun, turn = unpack(redis.call('HMGET', P2P_KEY, 'secret', 'ttl', 'stun', 'turn'))
  if not ttl then return false end
  ICE = { secret = secret, ttl = tonumber(ttl), stun = stun, turn = turn }
  return true
end

local function bytes_of_hex(h)
  return (string.gsub(h, '..', function(x) return string.char(tonumber(x, 16)) end))
end

-- The key blocks of HMAC-SHA1 for the last secret seen (kept across calls, like the rules).
local PADS_FOR, IPAD, OPAD

-- HMAC-SHA1 (RFC 2104) of msg under key, as 20 bytes.
local function hmac_sha1(key, msg)
  if key ~= PADS_FOR then
    local k = key
    if #k > 64 then k = bytes_of_hex(redis.sha1hex(k)) end
    local i, o = {}, {}
    for n = 1, 64 do
      local b = string.byte(k, n) or 0
      i[n] = string.char(bit.bxor(b, 0x36))
      o[n] = string.char(bit.bxor(b, 0x5c))
    end
    PADS_FOR, IPAD, OPAD = key, table.concat(i), table.concat(o)
  end
  return bytes_of_hex(redis.sha1hex(OPAD .. bytes_of_hex(redis.sha1hex(IPAD .. msg))))
end

local B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'

-- Standard base64 (RFC 4648, with padding).
local function base64(s)
  local t = {}
  for i = 1, #s, 3 do
    local a, b, c = string.byte(s, i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local sextets = { math.floor(n / 262144), math.floor(n / 4096) % 64, math.floor(n / 64) % 64, n % 64 }
    for j = 1, 4 do
      if (j == 3 and not b) or (j == 4 and not c) then
        t[#t + 1] = '='
      else
        t[#t + 1] = string.sub(B64, sextets[j] + 1, sextets[j] + 1)
      end
    end
  end
  return table.concat(t)
end

-- The p2p media JSON of the member with handle h: the STUN entry, and the TURN entry with
-- credentials in the TURN REST scheme (username "<unix expiry>:<h>", credential
-- base64(HMAC-SHA1(secret, username))), as p2p.rs mints them for the in-memory engine.
local function p2p_media(h)
  local servers = {}
  if ICE.stun ~= '' then servers[1] = ICE.stun end
  if ICE.turn ~= '' then
    local username = (math.floor(NOW / 1000) + ICE.ttl) .. ':' .. h
    servers[#servers + 1] = '{"urls":' .. ICE.turn .. ',"username":"' .. username ..
      '","credential":"' .. base64(hmac_sha1(ICE.secret, username)) .. '"}'
  end
  return '{"provider":"p2p","ice_servers":[' .. table.concat(servers, ',') .. ']}'
end

-- The session is live: both members learn it with `matched`, with their media: the room's
-- (mf, ms: JSON, LiveKit), or else the ICE servers with credentials minted now (p2p).
-- m1, m2: { user, handle, since (queued at), away }.
local function announce(sid, m1, m2, mf, ms)
  local keep = math.max(R.window, 3600000)
  for _, pair in ipairs({ { m1, m2 }, { m2, m1 } }) do
    table.insert(out.waits, math.max(NOW - pair[1].since, 0))
    -- Remembered for anti-repeat and as the default target of block and report, for as long
    -- as the user is here (see `forget_later`): older sessions go when a new one is added.
    local mk = P .. ':met:' .. pair[1].user
    redis.call('LPUSH', mk, sid .. '\t' .. NOW .. '\t' .. pair[2].user)
    redis.call('LTRIM', mk, 0, 15)
    while true do
      local oldest = redis.call('LINDEX', mk, -1)
      local at = oldest and tonumber(string.match(oldest, '^[^\t]*\t(%d+)\t'))
      if not at or NOW - at <= keep then break end
      redis.call('RPOP', mk)
    end
    redis.call('PERSIST', mk)
  end
  local e1 = { type = 'matched', session_id = sid, peer = m2.handle, role = 'offerer', started_at_ms = NOW }
  local e2 = { type = 'matched', session_id = sid, peer = m1.handle, role = 'answerer', started_at_ms = NOW }
  if not mf then mf, ms = p2p_media(m1.handle), p2p_media(m2.handle) end
  emit(m1.user, e1, '"media":' .. mf)
  emit(m2.user, e2, '"media":' .. ms)
  -- A member whose connection dropped before the match went live: the other one learns it
  -- right away, as in a running session.
  for _, pair in ipairs({ { m1, m2 }, { m2, m1 } }) do
    if pair[1].away then
      emit(pair[2].user, { type = 'peer_status', session_id = sid, state = 'reconnecting' })
    end
  end
end

-- Turns a paired session (proposed, or waiting for its room) live.
local function go_live(sid, mf, ms)
  local u1, u2, h1, h2 = unpack(redis.call('HMGET', skey(sid), 'u1', 'u2', 'h1', 'h2'))
  redis.call('HSET', skey(sid), 'phase', 'live', 'live', NOW)
  redis.call('ZREM', P .. ':pending', sid)
  local m = {}
  for i, x in ipairs({ { u1, h1 }, { u2, h2 } }) do
    local since, away = unpack(redis.call('HMGET', ukey(x[1]), 'since', 'away'))
    -- Met somebody: nobody is avoided any more (user ids are never empty).
    redis.call('HSET', ukey(x[1]), 'state', 'session', 'avoid', '')
    m[i] = { user = x[1], handle = x[2], since = tonumber(since), away = away == '1' }
  end
  announce(sid, m[1], m[2], mf, ms)
end

-- Hands a paired session to the media side: its room is made outside this call.
local function await_room(sid)
  local h1, h2 = unpack(redis.call('HMGET', skey(sid), 'h1', 'h2'))
  redis.call('HSET', skey(sid), 'phase', 'pending')
  redis.call('ZADD', P .. ':pending', NOW + MEDIA_PENDING, sid)
  table.insert(out.pending, { sid, h1, h2 })
end

local function start_session(a, b)
  local wa, wb = take_waiting(a), take_waiting(b)
  -- The user who waited longer offers.
  local first, second, wf, ws = a, b, wa, wb
  if wb.ticket < wa.ticket then first, second, wf, ws = b, a, wb, wa end
  local sid = new_id('s_', 32)
  local hf, hs = new_id('p_', 16), new_id('p_', 16)
  -- Smoothed waits, per pool and over all (one read and one write when both share a pool).
  local pool_wait, all_wait = unpack(redis.call('HMGET', P .. ':waits', wf.pk, '*'))
  local wait_f, wait_s = math.max(NOW - wf.since, 0), math.max(NOW - ws.since, 0)
  all_wait = ewma(ewma(all_wait, wait_f), wait_s)
  if ws.pk == wf.pk then
    redis.call('HSET', P .. ':waits', wf.pk, ewma(ewma(pool_wait, wait_f), wait_s), '*', all_wait)
  else
    local other_wait = redis.call('HGET', P .. ':waits', ws.pk)
    redis.call('HSET', P .. ':waits', wf.pk, ewma(pool_wait, wait_f), ws.pk,
      ewma(other_wait, wait_s), '*', all_wait)
  end
  -- Only now: a pool the pair leaves empty goes, with its smoothed wait.
  pools_changed(wf)
  pools_changed(ws)
  redis.call('HINCRBY', P .. ':stat', 'sessions', 1)
  if R.accept == 0 and MEDIA_PENDING == 0 then
    -- Live at once (the common case, kept to the fewest calls).
    for _, u in ipairs({ first, second }) do
      -- Met somebody: nobody is avoided any more (user ids are never empty).
      redis.call('HSET', ukey(u), 'state', 'session', 'sid', sid, 'avoid', '')
    end
    redis.call('HSET', skey(sid), 'u1', first, 'u2', second, 'h1', hf, 'h2', hs, 'created', NOW,
      'phase', 'live', 'live', NOW)
    -- Both were waiting and connected: try_match pairs only those.
    announce(sid, { user = first, handle = hf, since = wf.since, away = false },
      { user = second, handle = hs, since = ws.since, away = false }, nil, nil)
    return
  end
  for _, u in ipairs({ first, second }) do
    redis.call('HSET', ukey(u), 'state', 'pending', 'sid', sid)
  end
  redis.call('HSET', skey(sid), 'u1', first, 'u2', second, 'h1', hf, 'h2', hs, 'created', NOW,
    'phase', 'pending')
  if MEDIA_PENDING > 0 then redis.call('ZADD', P .. ':sessions', NOW, sid) end
  if R.accept > 0 then
    redis.call('HSET', skey(sid), 'phase', 'proposed')
    -- The timer runs on the instance that made the match; the deadline here covers its death.
    redis.call('ZADD', P .. ':pending', NOW + R.accept + GRACE, sid)
    local expires = NOW + R.accept
    emit(first, { type = 'match_proposed', match_id = sid, peer = hs, expires_at_ms = expires })
    emit(second, { type = 'match_proposed', match_id = sid, peer = hf, expires_at_ms = expires })
    timer(R.accept, first, 'proposal', sid)
  else
    await_room(sid)
  end
end

-- Whether waiting u may be matched with c: true yes, false only once the anti-repeat
-- fallback applies, nil never (now).
local function eligible(u, uf, met, c)
  if c == u or c == uf.avoid then return nil end
  local cstate, caway, cavoid, csince, cblocks = unpack(redis.call('HMGET', ukey(c), 'state',
    'away', 'avoid', 'since', 'hb'))
  -- Away users are listed apart (P:held); `caway` covers pools an earlier version of this
  -- library wrote during a rolling upgrade.
  if cstate ~= 'queued' or caway ~= '0' or cavoid == u then return nil end
  if blocked(u, uf.blocks, c, cblocks) then return nil end
  if not met[c] then return true end
  if NOW - uf.since >= R.fallback or NOW - tonumber(csince) >= R.fallback then return true end
  return false, tonumber(csince)
end

-- Matches a waiting, connected user with the longest-waiting eligible user in any of its
-- pools. When only recently met users are there, arms the anti-repeat fallback. The walk
-- visits connected waiters only (see P:held) and passes over only those u blocked or was
-- blocked by, avoids or is avoided by, and its recent partners, as in memory.rs.
local function try_match(u)
  local state, away, pk, wider, avoid, since, ticket, fb, hb = unpack(redis.call('HMGET',
    ukey(u), 'state', 'away', 'pool', 'wider', 'avoid', 'since', 'ticket', 'fb', 'hb'))
  if state ~= 'queued' or away == '1' then return end
  local uf = { avoid = avoid, since = tonumber(since), blocks = hb }
  local met = met_within(u)
  -- held_back: the earliest start of waiting among candidates held back by anti-repeat (the
  -- fallback is due when either side has waited long enough).
  local best, best_ticket, held_back = nil, nil, nil
  for _, k in ipairs(pools_of(pk, wider)) do
    local start, done = 0, false
    while not done do
      local batch = redis.call('ZRANGE', zkey(k), start, start + 99, 'WITHSCORES')
      for i = 1, #batch, 2 do
        local c, t = batch[i], tonumber(batch[i + 1])
        if best_ticket and t >= best_ticket then done = true break end
        local ok, csince = eligible(u, uf, met, c)
        if ok then
          best, best_ticket, done = c, t, true
          break
        elseif ok == false then
          held_back = math.min(held_back or csince, csince)
        end
      end
      if #batch < 200 then done = true end
      start = start + 100
    end
  end
  if best then
    start_session(u, best)
  elseif held_back then
    -- `fb`: when the armed fallback timer is due. A timer is lost with its instance, so one
    -- long overdue is armed again here.
    local due = math.min(uf.since, held_back) + R.fallback
    local armed = tonumber(fb) or 0
    if armed == 0 or armed + 1000 < NOW then
      redis.call('HSET', ukey(u), 'fb', due)
      timer(due - NOW, u, 'rematch', ticket)
    end
  end
end

-- Puts an idle user in the queue of pool `pk`, tells them, and matches them if possible.
-- `soft`: whether the user's preferences can widen (relaxation timers).
local function queue(u, pk, soft)
  local ticket = redis.call('INCR', P .. ':ticket')
  local position = ahead(pk, nil)
  local h = ukey(u)
  -- A user re-queued while away (the peer of a skipper, say) waits among the away ones.
  list(u, pk, ticket, redis.call('HGET', h, 'away') == '1')
  local est = estimate(pk, position)
  redis.call('HSET', h, 'state', 'queued', 'pool', pk, 'wider', '', 'fb', '0', 'ticket', ticket,
    'since', NOW, 'told_pos', position, 'told_est', est or '')
  redis.call('HINCRBY', P .. ':stat', 'queued', 1)
  if soft then timer(R.relax, u, 'relax', ticket) end
  emit(u, { type = 'queued', position = position, estimated_wait_ms = null_or(est) })
  try_match(u)
end

-- Puts a user who was matched back at the tail of its pool, with the preferences it had.
local function requeue(u)
  local pk, rkeys = unpack(redis.call('HMGET', ukey(u), 'pool', 'rkeys'))
  queue(u, pk, (rkeys or '') ~= '')
end

-- Removes a session's own keys.
local function drop_session(sid)
  redis.call('DEL', skey(sid))
  redis.call('HINCRBY', P .. ':stat', 'sessions', -1)
  if MEDIA_PENDING > 0 then redis.call('ZREM', P .. ':sessions', sid) end
  if MEDIA_PENDING > 0 or R.accept > 0 then redis.call('ZREM', P .. ':pending', sid) end
  table.insert(out.ended_sessions, sid)
end

-- Undoes a paired session that is not live yet. `verdict(u, accepted)` says what happens to
-- each member: { 'back', event or nil } (back to its old place, matched again), { 'out',
-- event } (idle) or { 'tail', event } (to the tail of the queue).
local function undo_match(sid, verdict)
  local u1, u2, a1, a2, phase = unpack(redis.call('HMGET', skey(sid), 'u1', 'u2', 'a1', 'a2', 'phase'))
  if not u1 then return end
  drop_session(sid)
  local accepted = { a1 == '1', a2 == '1' }
  if phase ~= 'proposed' then accepted = { true, true } end
  local back = {}
  for i, u in ipairs({ u1, u2 }) do
    if redis.call('HGET', ukey(u), 'state') == 'pending' then
      local v = verdict(u, accepted[i])
      if v[1] == 'back' then
        restore(u)
        if v[2] then emit(u, v[2]) end
        table.insert(back, u)
      else
        redis.call('HSET', ukey(u), 'state', 'idle')
        emit(u, v[2])
        if v[1] == 'tail' then requeue(u) end
      end
    end
  end
  for _, u in ipairs(back) do try_match(u) end
end

-- What the member left behind learns when the other leaves a not-yet-live match.
local function left_behind(sid)
  if R.accept > 0 then
    return { 'back', { type = 'match_cancelled', match_id = sid, reason = 'peer_left', requeued = true } }
  end
  return { 'back', nil }
end

-- A user who declined or let a proposal lapse: idle, or the tail of the queue.
local function refused(sid, reason)
  local ev = { type = 'match_cancelled', match_id = sid, reason = reason, requeued = R.tail }
  if R.tail then return { 'tail', ev } end
  return { 'out', ev }
end

-- The member u leaves its not-yet-live match with `reason` (end, timeout).
local function leave_match(u, reason)
  local sid = redis.call('HGET', ukey(u), 'sid')
  undo_match(sid, function(m)
    if m == u then return { 'out', { type = 'dequeued', reason = reason } } end
    return left_behind(sid)
  end)
end

-- Sets `avoid` between the members of a paired session: like after a skip, they are not
-- paired again right away.
local function keep_apart(sid)
  local u1, u2 = unpack(redis.call('HMGET', skey(sid), 'u1', 'u2'))
  if not u1 then return end
  redis.call('HSET', ukey(u1), 'avoid', u2)
  redis.call('HSET', ukey(u2), 'avoid', u1)
end

local function proposal_expired(sid)
  keep_apart(sid)
  undo_match(sid, function(_, accepted)
    if accepted then
      return { 'back', { type = 'match_cancelled', match_id = sid, reason = 'peer_timeout', requeued = true } }
    end
    return refused(sid, 'timeout')
  end)
end

local function media_failed(sid, message)
  if redis.call('HGET', skey(sid), 'phase') ~= 'pending' then return end
  undo_match(sid, function()
    return { 'back', { type = 'error', code = 'media_unavailable', message = message } }
  end)
end

-- Ends u's session: tells both sides why, then re-queues whoever the rule says. Returns how
-- long it was live, in ms.
local function end_session(u, own_reason, own_requeue, peer_reason, peer_requeue)
  local sid, peer = session_of(u)
  local live = tonumber(redis.call('HGET', skey(sid), 'live')) or NOW
  local lived = NOW - live
  drop_session(sid)
  -- A real conversation: whatever skipping came before is forgiven.
  if lived >= R.quick then
    for _, who in ipairs({ u, peer }) do redis.call('HDEL', P .. ':cd:' .. who, 'qs', 'lvl') end
  end
  local again = {}
  for _, x in ipairs({ { u, own_reason, own_requeue }, { peer, peer_reason, peer_requeue } }) do
    local h = ukey(x[1])
    if redis.call('HGET', h, 'state') == 'session' then
      redis.call('HSET', h, 'state', 'idle')
      if x[3] then table.insert(again, x[1]) end
    end
    emit(x[1], { type = 'session_ended', session_id = sid, reason = x[2], requeued = x[3] })
  end
  table.insert(out.ended, own_reason)
  for _, who in ipairs(again) do
    requeue(who)
  end
  return lived
end

-- The cooldown left for u, in ms (0: none).
local function cooldown_left(u)
  local untl = tonumber(redis.call('HGET', P .. ':cd:' .. u, 'until')) or 0
  return math.max(untl - NOW, 0)
end

-- Records a skip by u after a session of `lived` ms; returns the cooldown it starts, if any.
local function count_skip(u, lived)
  if lived >= R.quick then return nil end
  local k = P .. ':cd:' .. u
  -- A skip window without a cooldown since the last one: the next one starts short again.
  local untl = tonumber(redis.call('HGET', k, 'until'))
  if untl and NOW >= untl + R.skip_window then redis.call('HDEL', k, 'lvl', 'until') end
  local qs = {}
  for _, t in ipairs(split(redis.call('HGET', k, 'qs'), ',')) do
    if NOW - tonumber(t) < R.skip_window then table.insert(qs, t) end
  end
  table.insert(qs, tostring(NOW))
  local cooldown = nil
  if #qs >= R.limit then
    local level = (tonumber(redis.call('HGET', k, 'lvl')) or 0) + 1
    cooldown = R.cooldowns[math.min(level, #R.cooldowns)]
    redis.call('HSET', k, 'lvl', level, 'until', NOW + cooldown)
    qs = {}
  end
  redis.call('HSET', k, 'qs', table.concat(qs, ','))
  -- Kept while it can still matter: the cooldown, then a skip window.
  local left = math.max((tonumber(redis.call('HGET', k, 'until')) or 0) - NOW, 0)
  redis.call('PEXPIRE', k, left + R.skip_window)
  return cooldown
end

-- Counts an enqueue of u against the per-user rate (a one-minute window that starts with the
-- first enqueue); returns the ms to wait when over it.
-- The window's start is kept and compared with NOW (the key's expiry only frees memory), so
-- the rule follows the call's clock like every other one.
local function count_enqueue(u)
  local k = P .. ':enqw:' .. u
  local start, n = unpack(redis.call('HMGET', k, 'start', 'n'))
  start, n = tonumber(start), tonumber(n) or 0
  if not start or NOW - start >= 60000 then start, n = NOW, 0 end
  if n >= R.enq then return 60000 - (NOW - start) + 1 end
  redis.call('HSET', k, 'start', start, 'n', n + 1)
  -- A whole minute, not what is left of it: the key's lifetime runs on Redis's own clock.
  redis.call('PEXPIRE', k, 60000)
  return nil
end

-- Remembers that u ended a session that lasted `lived` ms (by end, block, or leaving the media
-- room), for count_quick_end.
local function note_quick_end(u, lived)
  if lived >= R.quick then return end
  local k = P .. ':cd:' .. u
  redis.call('HSET', k, 'qe', NOW)
  if redis.call('PTTL', k) < R.quick then redis.call('PEXPIRE', k, R.quick) end
end

-- An enqueue soon after u ended a session quickly: a quick skip by another name (otherwise
-- end and enqueue would cycle partners with no cooldown). Returns the cooldown it starts, if
-- any: the enqueue is then refused.
local function count_quick_end(u)
  local k = P .. ':cd:' .. u
  local ended = tonumber(redis.call('HGET', k, 'qe'))
  if not ended then return nil end
  redis.call('HDEL', k, 'qe')
  if NOW - ended >= R.quick then return nil end
  return count_skip(u, 0)
end

-- u blocks `peer`: the newest of u's at most max_blocks blocks (the oldest goes first).
-- Returns whether an old block was dropped.
local function add_block(u, peer)
  local set, times = P .. ':blk:' .. u, P .. ':blkt:' .. u
  redis.call('SADD', set, peer)
  -- Scores only order the blocks: keep them strictly increasing, even within one ms.
  local newest = redis.call('ZRANGE', times, -1, -1, 'WITHSCORES')
  redis.call('ZADD', times, math.max(NOW, (tonumber(newest[2]) or 0) + 1), peer)
  local over = redis.call('ZCARD', times) - R.max_blocks
  if over > 0 then
    local oldest = redis.call('ZRANGE', times, 0, over - 1)
    redis.call('SREM', set, unpack(oldest))
    redis.call('ZREMRANGEBYRANK', times, 0, over - 1)
  end
  redis.call('HSET', ukey(u), 'hb', '1')
  return over > 0
end

-- Widens the search of waiting u (queue place `ticket`) by one relaxation step.
local function relax(u, ticket)
  local h = ukey(u)
  local state, t, pk, wider, rkeys, rprefs, away = unpack(redis.call('HMGET', h, 'state', 'ticket',
    'pool', 'wider', 'rkeys', 'rprefs', 'away'))
  if t ~= ticket then return end
  -- Paired meanwhile: if the match is undone, the search goes on widening.
  if state == 'pending' then timer(R.relax, u, 'relax', ticket) end
  if state ~= 'queued' then return end
  local done, keys = split(wider, '\n'), split(rkeys, '\n')
  local level = #done + 1
  if level > #keys then return end
  local key = keys[level]
  list(u, key, ticket, away == '1')
  table.insert(done, key)
  local position = ahead(pk, ticket)
  local est = estimate(pk, position)
  redis.call('HSET', h, 'wider', table.concat(done, '\n'), 'told_pos', position, 'told_est', est or '')
  emit(u, { type = 'queue_update', position = position, estimated_wait_ms = null_or(est),
    widened_to = cjson.decode(rprefs)[level] })
  if level < #keys then timer(R.relax, u, 'relax', ticket) end
  try_match(u)
end

-- The peer of u in `session` ("" for the current live session, else the most recent one):
-- session id and peer, or nil.
local function peer_in(u, session)
  local sid, peer = session_of(u)
  if sid and (session == '' or session == sid) then return sid, peer end
  for _, m in ipairs(met_list(u)) do
    if session == '' or session == m[1] then return m[1], m[3] end
  end
  return nil
end

-- Which member (1 or 2) of the open proposal `mid` u is, or nil.
local function proposal_member(u, mid)
  local state, sid = unpack(redis.call('HMGET', ukey(u), 'state', 'sid'))
  if state ~= 'pending' or sid ~= mid then return nil end
  local u1, u2, phase = unpack(redis.call('HMGET', skey(mid), 'u1', 'u2', 'phase'))
  if phase ~= 'proposed' then return nil end
  if u1 == u then return 1 end
  if u2 == u then return 2 end
  return nil
end

-- u is gone: the sessions u had are forgotten once nothing can ask for them any more (the
-- anti-repeat window, an hour for the defaults of block and report, a skip window after the
-- longest cooldown), unless u is back by then (attach keeps them again).
local function forget_later(u)
  local longest = 0
  for _, c in ipairs(R.cooldowns) do longest = math.max(longest, c) end
  redis.call('PEXPIRE', P .. ':met:' .. u, math.max(R.window, 3600000, longest + R.skip_window))
end

-- The connection `conn` of u went away: hold the state for the grace period.
local function detach(u, conn)
  local h = ukey(u)
  local c, a, inst = unpack(redis.call('HMGET', h, 'conn', 'away', 'inst'))
  if c ~= conn or a == '1' then return end
  redis.call('HSET', h, 'away', '1')
  set_away(u, true)
  redis.call('SREM', P .. ':iu:' .. inst, u)
  redis.call('ZADD', P .. ':exp', NOW + GRACE, u .. '\n' .. conn)
  if redis.call('PTTL', P .. ':log:' .. u) < 2 * GRACE then
    redis.call('PEXPIRE', P .. ':log:' .. u, 2 * GRACE)
  end
  out.held = true
  local sid, peer = session_of(u)
  if sid then emit(peer, { type = 'peer_status', session_id = sid, state = 'reconnecting' }) end
end

-- The grace period of (u, conn) ran out and u did not come back. Two phases, one grace period
-- apart: first the queue place or session goes (u's own `dequeued`/`session_ended` with reason
-- `timeout` stays in the log for a client that comes back a little later), then the user.
local function expire(u, conn)
  local member = u .. '\n' .. conn
  -- Both the instance's own timer and any instance's sweep may call this: only a due entry
  -- counts, so the first call does the work and the second finds nothing (or the next phase,
  -- not yet due).
  local due = tonumber(redis.call('ZSCORE', P .. ':exp', member))
  if not due or due > NOW then return end
  redis.call('ZREM', P .. ':exp', member)
  local h = ukey(u)
  local c, a, state = unpack(redis.call('HMGET', h, 'conn', 'away', 'state'))
  if c ~= conn or a ~= '1' then return end
  if state == 'queued' then
    dequeue(u, 'timeout')
  elseif state == 'session' and session_of(u) then
    end_session(u, 'timeout', false, 'peer_disconnected', REQUEUE_PEER)
  elseif state == 'pending' then
    leave_match(u, 'timeout')
  else
    redis.call('DEL', h, P .. ':log:' .. u)
    -- Gone for good: the blocks u made go once u has stayed away for the block TTL.
    for _, k in ipairs({ P .. ':blk:' .. u, P .. ':blkt:' .. u }) do
      redis.call('PEXPIRE', k, R.block_ttl)
    end
    forget_later(u)
    return
  end
  redis.call('ZADD', P .. ':exp', NOW + GRACE, member)
  redis.call('PEXPIRE', P .. ':log:' .. u, 2 * GRACE)
  out.held = true
end

-- The logged events of u after `last`, if the log still holds all of them.
local function events_since(u, seq, last)
  if last > seq then return false, {} end
  if last == seq then return true, {} end
  local entries = redis.call('LRANGE', P .. ':log:' .. u, 0, -1)
  if #entries == 0 or tonumber(string.match(entries[1], '^(%d+) ')) > last + 1 then
    return false, {}
  end
  local replay = {}
  for _, e in ipairs(entries) do
    local s, text = string.match(e, '^(%d+) %d+ (.*)$')
    if tonumber(s) > last then table.insert(replay, { tonumber(s), text }) end
  end
  return true, replay
end

local function state_name(state)
  if state == 'session' then return 'in_session' end
  -- The client learns of the match only with `matched`.
  if state == 'pending' then return 'queued' end
  return state
end

local function result(extra)
  extra = extra or {}
  for k, v in pairs(out) do extra[k] = v end
  return cjson.encode(extra)
end

-- A `ref` argument is "" when absent and "=<ref>" when present (an empty ref is valid).
local function set_ref(arg)
  actor = USER
  if arg ~= '' then ref = string.sub(arg, 2) end
end

local function with_user(required)
  local state = redis.call('HGET', ukey(USER), 'state')
  if not state and required then return nil end
  return state
end

-- Operations with many helpers of their own live in functions of their own rather than in
-- `call`: a Lua 5.1 function may refer to at most 60 enclosing locals.

-- The `enqueue` of USER (arg: 1 prefs JSON, 2 pool key, 3 ref, 4 relaxed pool keys
-- ("\n"-separated), 5 relaxed prefs (JSON array, one per step)).
local function enqueue_op()
  set_ref(arg(3))
  local state = with_user(true)
  if not state then return fail('invalid_state', 'no live connection for this user') end
  if state == 'queued' or state == 'pending' then return fail('invalid_state', 'already queued') end
  if state == 'session' then
    return fail('invalid_state', 'already in a session: skip or end it first')
  end
  local left = cooldown_left(USER)
  if left > 0 then return fail('cooldown', 'too many quick skips: wait for the cooldown', left + 1) end
  local cooldown = count_quick_end(USER)
  if cooldown then return fail('cooldown', 'too many quick skips: wait for the cooldown', cooldown) end
  local wait = count_enqueue(USER)
  if wait then return fail('rate_limited', 'too many enqueues: slow down', wait) end
  redis.call('HSET', ukey(USER), 'prefs', arg(1), 'rkeys', arg(4), 'rprefs', arg(5))
  queue(USER, arg(2), arg(4) ~= '')
  return result()
end

-- The `skip` of USER (arg: 1 ref, 2 the message of the error that announces a cooldown).
local function skip_op()
  set_ref(arg(1))
  local left = cooldown_left(USER)
  if left > 0 then return fail('cooldown', 'too many quick skips: wait for the cooldown', left + 1) end
  local sid, peer = session_of(USER)
  if not sid then return fail('invalid_state', 'not in a session') end
  redis.call('HSET', ukey(USER), 'avoid', peer)
  redis.call('HSET', ukey(peer), 'avoid', USER)
  local live = tonumber(redis.call('HGET', skey(sid), 'live')) or NOW
  -- The skip that starts a cooldown still ends the session, but does not re-queue.
  local cooldown = count_skip(USER, NOW - live)
  end_session(USER, 'skip', cooldown == nil, 'peer_skipped', REQUEUE_PEER)
  if cooldown then
    emit(USER, { type = 'error', code = 'cooldown', message = arg(2), retry_after_ms = cooldown })
  end
  return result()
end

-- The `end` of USER (arg: 1 ref).
local function end_op()
  set_ref(arg(1))
  local state = with_user(true)
  if not state then return fail('invalid_state', 'no live connection for this user') end
  if state == 'queued' then
    dequeue(USER, 'end')
  elseif state == 'pending' then
    leave_match(USER, 'end')
  elseif state == 'session' and session_of(USER) then
    note_quick_end(USER, end_session(USER, 'end', false, 'peer_ended', false))
  else
    return fail('invalid_state', 'not queued or in a session')
  end
  return result()
end

-- The `block` of USER (arg: 1 the session whose peer to block, "" for the current or most
-- recent one).
local function block_op()
  if not with_user(true) then return fail('invalid_state', 'no live connection for this user') end
  local sid, peer = peer_in(USER, arg(1))
  if not sid then return fail('invalid_state', 'no such session to block a peer from') end
  -- A dropped block may leave the blocker, if it waits, free to meet somebody who waits too.
  if add_block(USER, peer) then try_match(USER) end
  if session_of(USER) == sid then
    note_quick_end(USER, end_session(USER, 'end', false, 'peer_ended', false))
  end
  return result()
end

-- u's state as `status` reports it, or nil when u has no state.
local function status_of(u)
  local state, pk, ticket, sid = unpack(redis.call('HMGET', ukey(u), 'state', 'pool', 'ticket', 'sid'))
  if not state then return nil end
  local st = { state = state_name(state) }
  if state == 'queued' then
    st.position = ahead(pk, ticket)
    st.estimated_wait_ms = estimate(pk, st.position)
  elseif state == 'pending' then
    st.position = 0
  elseif state == 'session' then
    st.session_id = sid
    local u1, h1, h2 = unpack(redis.call('HMGET', skey(sid), 'u1', 'h1', 'h2'))
    if u1 == u then
      st.role, st.peer = 'offerer', h2
    elseif u1 then
      st.role, st.peer = 'answerer', h1
    end
  end
  return st
end

-- Sends `queue_update` to the connected waiting users of pool pk whose position or estimate
-- moved since they were last told.
local function refresh_pool(pk)
  -- The connected waiters, whose positions also count the away ones ahead of them.
  local users = redis.call('ZRANGE', zkey(pk), 0, -1, 'WITHSCORES')
  local held = redis.call('ZCARD', hkey(pk))
  for i = 1, #users, 2 do
    local u = users[i]
    local position = (i - 1) / 2
    if held > 0 then position = position + redis.call('ZCOUNT', hkey(pk), '-inf', '(' .. users[i + 1]) end
    local est = estimate(pk, position)
    local away, told_pos, told_est, own = unpack(redis.call('HMGET', ukey(u), 'away', 'told_pos', 'told_est', 'pool'))
    local old = tonumber(told_est)
    local moved
    if old and est then
      moved = math.abs(old - est) * 5 > math.max(old, est)
    else
      moved = (old == nil) ~= (est == nil)
    end
    -- Users listed here because their search widened are told about their own pool.
    if own == pk and away == '0' and (tonumber(told_pos) ~= position or moved) then
      redis.call('HSET', ukey(u), 'told_pos', position, 'told_est', est or '')
      emit(u, { type = 'queue_update', position = position, estimated_wait_ms = null_or(est) })
    end
  end
end

local function call(keys, args)
  ARGV = args
  P, OP = ARGV[1], ARGV[2]
  REQUEUE_PEER = ARGV[3] == '1'
  HISTORY_LEN, HISTORY_TTL, GRACE = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  CH, ENTROPY, USER = ARGV[7], ARGV[8], ARGV[9]
  local media, media_arg = string.match(ARGV[10], '^(%S+) (.*)$')
  MEDIA_PENDING, P2P_KEY, ICE = 0, nil, nil
  if media == 'livekit' then
    MEDIA_PENDING = tonumber(media_arg)
  else
    P2P_KEY = P .. ':p2p:' .. media_arg
  end
  -- Parsed once per rules text: the library's locals outlive calls.
  if ARGV[11] ~= RULES_TEXT then R, RULES_TEXT = read_rules(ARGV[11]), ARGV[11] end
  -- Tests only: a second key '<prefix>:test_now:<ms>' (never read or written) gives the time.
  local test_now = keys[2] and string.match(keys[2], ':test_now:(%d+)$')
  if test_now then
    NOW = tonumber(test_now)
  else
    local t = redis.call('TIME')
    NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  out = { waits = {}, ended = {}, changed = {}, held = false, published = 0, pending = {},
    ended_sessions = {}, timers = {} }
  actor, ref, id_counter = nil, nil, 0
  -- Checked before anything changes: any operation may make a match.
  if P2P_KEY and OP ~= 'p2p_config' and not load_p2p() then
    return fail('p2p_config_missing', 'this instance has not written its p2p configuration')
  end

  if OP == 'attach' then
    local conn, inst, token, last = ARGV[12], ARGV[13], ARGV[14], tonumber(ARGV[15]) or 0
    local h = ukey(USER)
    local was_away = false
    if redis.call('EXISTS', h) == 0 then
      redis.call('HSET', h, 'conn', conn, 'inst', inst, 'away', '0', 'state', 'idle',
        'epoch', new_id('r_', 32), 'seq', 0,
        -- Blocks outlive the user's hash (for the block TTL).
        'hb', redis.call('EXISTS', P .. ':blk:' .. USER))
      -- Back in time: the blocks stay while the user is here.
      redis.call('PERSIST', P .. ':blk:' .. USER)
      redis.call('PERSIST', P .. ':blkt:' .. USER)
      redis.call('PERSIST', P .. ':met:' .. USER)
    else
      local old_inst, old_conn, a = unpack(redis.call('HMGET', h, 'inst', 'conn', 'away'))
      was_away = a == '1'
      -- Connection ids of one instance grow (fixed-width hex): an older connection whose
      -- attach arrives after a newer one's must not take the user back.
      if not was_away and old_inst == inst and old_conn > conn then
        return fail('replaced', 'a newer connection of this user took over')
      end
      if old_inst ~= inst then
        -- A live connection on another instance is replaced: that instance closes it.
        if not was_away then publish(old_inst, 'K' .. USER .. '\n' .. old_conn) end
        redis.call('SREM', P .. ':iu:' .. old_inst, USER)
      end
      redis.call('ZREM', P .. ':exp', USER .. '\n' .. old_conn)
      redis.call('HSET', h, 'conn', conn, 'inst', inst, 'away', '0')
    end
    redis.call('SADD', P .. ':iu:' .. inst, USER)
    local epoch, seq, state = unpack(redis.call('HMGET', h, 'epoch', 'seq', 'state'))
    seq = tonumber(seq)
    local resumed, replay = false, {}
    if token ~= '' and token == epoch then
      resumed, replay = events_since(USER, seq, last)
    end
    local attached = { state = state_name(state), resume_token = epoch, last_seq = seq,
      resumed = resumed, replay = replay }
    if was_away then
      local sid, peer = session_of(USER)
      if sid then
        emit(peer, { type = 'peer_status', session_id = sid, state = 'connected' })
      else
        set_away(USER, false)
        try_match(USER)
      end
    end
    return result(attached)
  elseif OP == 'detach' then
    detach(USER, ARGV[12])
    return result()
  elseif OP == 'expire' then
    expire(USER, ARGV[12])
    return result()
  elseif OP == 'enqueue' then
    return enqueue_op()
  elseif OP == 'skip' then
    return skip_op()
  elseif OP == 'end' then
    return end_op()
  elseif OP == 'status' then
    local st = status_of(USER)
    if not st then return fail('invalid_state', 'no live connection for this user') end
    return result({ status = st })
  elseif OP == 'refresh' then
    refresh_pool(arg(1))
    return result()
  elseif OP == 'since' then
    local c, seq = unpack(redis.call('HMGET', ukey(USER), 'conn', 'seq'))
    -- Another connection took over meanwhile (its notice may have been lost with pub/sub).
    if c ~= ARGV[12] then return fail('replaced', 'a newer connection of this user took over') end
    local ok, replay = events_since(USER, tonumber(seq), tonumber(ARGV[13]))
    return result({ resumed = ok, replay = replay })
  elseif OP == 'stats' then
    local queued, sessions = unpack(redis.call('HMGET', P .. ':stat', 'queued', 'sessions'))
    return result({ queued = tonumber(queued) or 0, sessions = tonumber(sessions) or 0 })
  elseif OP == 'tick' then
    -- Instance heartbeat and shared clean-up, run by every instance periodically. USER is the
    -- calling instance; ARGV[12] its heartbeat period, ARGV[13] the dataset epoch it knows, and
    -- ARGV[14] how many users or expiries to handle in this call.
    local inst, period, known, budget = USER, tonumber(ARGV[12]), ARGV[13], tonumber(ARGV[14])
    local epoch = redis.call('GET', P .. ':epoch')
    if not epoch then
      epoch = new_id('d_', 32)
      redis.call('SET', P .. ':epoch', epoch)
    end
    -- ZADD answers 1 when the instance was not listed: others took it for dead (or Redis lost
    -- everything), so its users were cleaned up and its connections must re-attach.
    local added = redis.call('ZADD', P .. ':instances', NOW, inst)
    -- An instance that ticks is alive, whatever others concluded while it was silent.
    redis.call('SREM', P .. ':dead', inst)
    -- If nobody ticked for more than a period, Redis (or the network to it) was away for
    -- everyone: every score is stale. Give all instances two periods to check in again before
    -- anyone is judged.
    local last = tonumber(redis.call('GET', P .. ':last_tick'))
    redis.call('SET', P .. ':last_tick', NOW)
    if last and NOW - last > period then
      redis.call('SET', P .. ':judge_after', NOW + 2 * period)
    end
    local dead = {}
    local judge_after = tonumber(redis.call('GET', P .. ':judge_after'))
    if not judge_after or NOW >= judge_after then
      -- Instances silent for two periods are dead; moving them to P:dead makes exactly one
      -- caller claim each, and any instance may finish the clean-up later.
      dead = redis.call('ZRANGEBYSCORE', P .. ':instances', '-inf', NOW - 2 * period)
      for _, d in ipairs(dead) do
        redis.call('ZREM', P .. ':instances', d)
        redis.call('SADD', P .. ':dead', d)
      end
    end
    local cleaned = 0
    for _, d in ipairs(redis.call('SMEMBERS', P .. ':dead')) do
      local users = redis.call('SPOP', P .. ':iu:' .. d, budget)
      for _, u in ipairs(users) do
        local c, i = unpack(redis.call('HMGET', ukey(u), 'conn', 'inst'))
        if i == d and c then detach(u, c) end
        cleaned = cleaned + 1
      end
      budget = budget - #users
      if redis.call('SCARD', P .. ':iu:' .. d) == 0 then redis.call('SREM', P .. ':dead', d) end
      if budget <= 0 then break end
    end
    local due = redis.call('ZRANGEBYSCORE', P .. ':exp', '-inf', NOW, 'LIMIT', 0, math.max(budget, 1))
    for _, m in ipairs(due) do
      local u, c = string.match(m, '^(.*)\n(.*)$')
      expire(u, c)
    end
    -- Paired sessions past their deadline: the instance setting up the room (or holding the
    -- proposal timer) died.
    local stuck = redis.call('ZRANGEBYSCORE', P .. ':pending', '-inf', NOW, 'LIMIT', 0, 100)
    for _, sid in ipairs(stuck) do
      redis.call('ZREM', P .. ':pending', sid)
      local phase = redis.call('HGET', skey(sid), 'phase')
      if phase == 'proposed' then
        proposal_expired(sid)
      elseif phase == 'pending' then
        media_failed(sid, ARGV[15])
      end
    end
    -- Held states from detaches above expire through P:exp, not through a timer of the caller.
    out.held = false
    return result({ epoch = epoch, epoch_changed = known ~= '' and known ~= epoch,
      rejoined = known ~= '' and added == 1,
      cleaned_users = cleaned, expired = #due, dead_instances = #dead })
  elseif OP == 'media_ready' then
    local sid = arg(1)
    if redis.call('HGET', skey(sid), 'phase') ~= 'pending' then return result({ live = false }) end
    go_live(sid, arg(2), arg(3))
    return result({ live = true })
  elseif OP == 'media_failed' then
    media_failed(arg(1), arg(2))
    return result()
  elseif OP == 'media_left' then
    -- arg: 1 session, 2 handle of who left ("" for everybody), 3 event id, 4 dedupe ms.
    local sid, left = ARGV[12], ARGV[13]
    if not redis.call('SET', P .. ':seen:' .. ARGV[14], '1', 'NX', 'PX', ARGV[15]) then
      return result({ effect = 'duplicate' })
    end
    local u1, u2, h1, h2, phase = unpack(redis.call('HMGET', skey(sid), 'u1', 'u2', 'h1', 'h2', 'phase'))
    if not u1 or phase ~= 'live' then return result({ effect = 'no_session' }) end
    if left == '' then
      end_session(u1, 'media_disconnected', false, 'media_disconnected', false)
    elseif left == h1 or left == h2 then
      local who = u1
      if left == h2 then who = u2 end
      note_quick_end(who, end_session(who, 'media_disconnected', false, 'media_disconnected', REQUEUE_PEER))
    else
      return result({ effect = 'no_session' })
    end
    return result({ effect = 'ended' })
  elseif OP == 'sessions' then
    local all = redis.call('ZRANGE', P .. ':sessions', 0, -1, 'WITHSCORES')
    local list = {}
    for i = 1, #all, 2 do
      local pending = redis.call('HGET', skey(all[i]), 'phase') ~= 'live'
      table.insert(list, { all[i], tonumber(all[i + 1]), pending })
    end
    return result({ session_list = list })
  elseif OP == 'block' then
    return block_op()
  elseif OP == 'peer' then
    if not with_user(true) then return fail('invalid_state', 'no live connection for this user') end
    local sid, peer = peer_in(USER, arg(1))
    if not sid then return fail('invalid_state', 'no such session') end
    return result({ session = sid, peer = peer })
  elseif OP == 'accept' then
    local mid = arg(1)
    if not with_user(true) then return fail('invalid_state', 'no live connection for this user') end
    local i = proposal_member(USER, mid)
    if not i then return fail('invalid_state', 'no such proposal open') end
    redis.call('HSET', skey(mid), 'a' .. i, '1')
    local a1, a2 = unpack(redis.call('HMGET', skey(mid), 'a1', 'a2'))
    if a1 == '1' and a2 == '1' then
      if MEDIA_PENDING > 0 then await_room(mid) else go_live(mid, nil, nil) end
    end
    return result()
  elseif OP == 'decline' then
    local mid = arg(1)
    if not with_user(true) then return fail('invalid_state', 'no live connection for this user') end
    if not proposal_member(USER, mid) then return fail('invalid_state', 'no such proposal open') end
    keep_apart(mid)
    undo_match(mid, function(m)
      if m == USER then return refused(mid, 'declined') end
      return { 'back', { type = 'match_cancelled', match_id = mid, reason = 'peer_declined', requeued = true } }
    end)
    return result()
  elseif OP == 'wake' then
    -- arg: 1 kind (relax, rematch, proposal), 2 ticket or match id.
    local kind, a = arg(1), arg(2)
    if kind == 'relax' then
      relax(USER, a)
    elseif kind == 'rematch' then
      local state, t = unpack(redis.call('HMGET', ukey(USER), 'state', 'ticket'))
      if state == 'queued' and t == a then
        redis.call('HSET', ukey(USER), 'fb', '0')
        try_match(USER)
      end
    elseif kind == 'proposal' then
      if redis.call('HGET', skey(a), 'phase') == 'proposed' then proposal_expired(a) end
    end
    return result()
  elseif OP == 'relay' then
    -- arg: 1 kind (signal, chat), 2 its JSON, checked and encoded by the gateway: the
    -- payload object as the client sent it, or the chat text as a string literal.
    local sid, peer = session_of(USER)
    if not sid then return fail('invalid_state', 'not in a session') end
    local frame
    if arg(1) == 'signal' then
      frame = '{"type":"signal","session_id":"' .. sid .. '","payload":' .. arg(2) .. '}'
    else
      frame = '{"type":"chat","session_id":"' .. sid .. '","text":' .. arg(2) .. ',"sent_at_ms":' .. NOW .. '}'
    end
    -- Not logged: a peer who is away misses it.
    local inst, away = unpack(redis.call('HMGET', ukey(peer), 'inst', 'away'))
    if inst and away == '0' then publish(inst, 'F' .. peer .. '\n0\n' .. frame) end
    return result()
  elseif OP == 'p2p_config' then
    -- USER is the instance; arg: 1 TURN secret, 2 credential lifetime s, 3 STUN entry JSON,
    -- 4 TURN urls JSON (each "" when not configured), 5 how long the key lives, ms.
    redis.call('HSET', P2P_KEY, 'secret', arg(1), 'ttl', arg(2), 'stun', arg(3), 'turn', arg(4))
    redis.call('PEXPIRE', P2P_KEY, arg(5))
    return result()
  elseif OP == 'lease' then
    -- USER is the instance; ARGV[12] the lease name, ARGV[13] its ttl in ms.
    local k = P .. ':lease:' .. ARGV[12]
    local holder = redis.call('GET', k)
    if holder and holder ~= USER then return result({ live = false }) end
    redis.call('SET', k, USER, 'PX', ARGV[13])
    return result({ live = true })
  end
  return fail('internal', 'unknown operation ' .. tostring(OP))
end

redis.register_function('matchgate_@VERSION@', call)

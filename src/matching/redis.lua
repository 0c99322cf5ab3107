#!lua name=matchgate_@VERSION@
-- matchgate's matching engine in Redis, a function library: every operation is one call of
-- the function `matchgate_<version>` (FCALL), so each is atomic however many gateway instances
-- race. It mirrors matching/memory.rs rule for rule. A library rather than a script: its
-- helpers are created once at load, not on every call. The gateway replaces @VERSION@ with a
-- hash of this text, so that during a rolling upgrade old and new gateways each call their own
-- version side by side.
--
-- KEYS[1]: any key with the deployment's hash tag (routes the call in Redis Cluster; every key
--          below shares that tag, so a call touches one slot).
-- ARGV: 1 key prefix (e.g. "{mg}"), 2 operation, 3 requeue peer on skip ("1"/"0"),
--       4 history length, 5 history ttl ms, 6 grace ms, 7 channel prefix, 8 entropy (random,
--       for ids), 9 user (or instance for instance-level operations), 10 media: how long a
--       session may wait for its room in ms ("0": no media, sessions start live),
--       11.. operation arguments.
-- Returns a JSON object: {"error": ..} or the operation's result plus the outcome fields
-- waits (ms), ended (reasons), changed (pools), held, published.
--
-- Key layout (P = prefix):
--   P:u:<user>      hash: conn inst away state pool prefs ticket since told_pos told_est sid
--                         avoid epoch seq; state is idle, queued, pending (matched, waiting
--                         for the media room; the queue fields are kept) or session
--   P:log:<user>    list of "<seq> <ms> <frame>", newest last, bounded, expires
--   P:pool:<pool>   zset of waiting users by ticket (FIFO)
--   P:s:<session>   hash: u1 u2 (u1 offers) h1 h2 (their handles) created pending
--   P:sessions      zset session -> ms matched (media mode only: what the room sweep checks)
--   P:pending       zset session -> ms by which its room must be ready, else it is undone
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
-- Frames go out with PUBLISH on <channel prefix><instance>: "F<user>\n<seq>\n<frame>" for a
-- frame (seq 0: none), "K<user>\n<conn>" to close a connection replaced from elsewhere.

-- Set at the start of every call (the library's functions are created once, at load).
local ARGV, P, OP, REQUEUE_PEER, HISTORY_LEN, HISTORY_TTL, GRACE, CH, ENTROPY, USER, NOW
local MEDIA_PENDING
local out, actor, ref, id_counter

local function ukey(u) return P .. ':u:' .. u end
local function skey(s) return P .. ':s:' .. s end
local function zkey(pk) return P .. ':pool:' .. pk end

local function new_id(prefix, len)
  id_counter = id_counter + 1
  return prefix .. string.sub(redis.sha1hex(ENTROPY .. ':' .. id_counter), 1, len)
end

local function fail(code, message)
  return cjson.encode({ error = code, message = message })
end

local function publish(inst, payload)
  redis.call('PUBLISH', CH .. inst, payload)
  out.published = out.published + 1
end

-- Appends an event to the user's log (if it carries a seq) and sends it to their instance.
local function emit(u, ev)
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
  if redis.call('ZCARD', zkey(pk)) == 0 then
    redis.call('HDEL', P .. ':waits', pk)
  else
    add_changed(pk)
  end
end

local function take_waiting(u)
  local h = ukey(u)
  local state, pk, since, ticket = unpack(redis.call('HMGET', h, 'state', 'pool', 'since', 'ticket'))
  if state ~= 'queued' then return nil end
  redis.call('ZREM', zkey(pk), u)
  -- Only the state changes: the queue fields are read only while the state is `queued`.
  redis.call('HSET', h, 'state', 'idle')
  redis.call('HINCRBY', P .. ':stat', 'queued', -1)
  return { pk = pk, since = tonumber(since), ticket = tonumber(ticket) }
end

-- Takes a waiting user out of the queue and tells them why.
local function dequeue(u, reason)
  local w = take_waiting(u)
  emit(u, { type = 'dequeued', reason = reason })
  pool_changed(w.pk)
end

local function session_of(u)
  local state, sid = unpack(redis.call('HMGET', ukey(u), 'state', 'sid'))
  if state ~= 'session' then return nil end
  local u1, u2 = unpack(redis.call('HMGET', skey(sid), 'u1', 'u2'))
  if not u1 then return nil end
  if u1 == u then return sid, u2 end
  return sid, u1
end

-- Sends `matched` to both members, with their media (JSON) when there is some.
local function announce(sid, first, second, hf, hs, mf, ms)
  local ef = { type = 'matched', session_id = sid, peer = hs, role = 'offerer', started_at_ms = NOW }
  local es = { type = 'matched', session_id = sid, peer = hf, role = 'answerer', started_at_ms = NOW }
  if mf then ef.media, es.media = cjson.decode(mf), cjson.decode(ms) end
  emit(first, ef)
  emit(second, es)
end

local function start_session(pk, a, b)
  local wa, wb = take_waiting(a), take_waiting(b)
  -- The user who waited longer offers.
  local first, second, wf, ws = a, b, wa, wb
  if wb.ticket < wa.ticket then first, second, wf, ws = b, a, wb, wa end
  local sid = new_id('s_', 32)
  local hf, hs = new_id('p_', 16), new_id('p_', 16)
  local pool_wait, all_wait = unpack(redis.call('HMGET', P .. ':waits', pk, '*'))
  for _, w in ipairs({ wf, ws }) do
    local waited = NOW - w.since
    if waited < 0 then waited = 0 end
    -- With media, the wait ends with `matched`, once the room is ready.
    if MEDIA_PENDING == 0 then table.insert(out.waits, waited) end
    pool_wait, all_wait = ewma(pool_wait, waited), ewma(all_wait, waited)
  end
  redis.call('HSET', P .. ':waits', pk, pool_wait, '*', all_wait)
  -- With media, the pair waits for its room; take_waiting kept the queue fields, so that a
  -- failed room puts both back where they were.
  local state = 'session'
  if MEDIA_PENDING > 0 then state = 'pending' end
  for _, u in ipairs({ first, second }) do
    redis.call('HSET', ukey(u), 'state', state, 'sid', sid)
    -- Met somebody: nobody is avoided any more (user ids are never empty). A pending match
    -- that is undone does not count: the avoided peer stays avoided.
    if state == 'session' then redis.call('HSET', ukey(u), 'avoid', '') end
  end
  redis.call('HSET', skey(sid), 'u1', first, 'u2', second, 'h1', hf, 'h2', hs, 'created', NOW)
  redis.call('HINCRBY', P .. ':stat', 'sessions', 1)
  if MEDIA_PENDING > 0 then
    redis.call('HSET', skey(sid), 'pending', '1')
    redis.call('ZADD', P .. ':sessions', NOW, sid)
    redis.call('ZADD', P .. ':pending', NOW + MEDIA_PENDING, sid)
    table.insert(out.pending, { sid, hf, hs })
  else
    announce(sid, first, second, hf, hs, nil, nil)
  end
  pool_changed(pk)
end

-- Matches a waiting, connected user with the longest-waiting compatible user in its pool.
local function try_match(u)
  local state, away, pk, avoid = unpack(redis.call('HMGET', ukey(u), 'state', 'away', 'pool', 'avoid'))
  if state ~= 'queued' or away == '1' then return end
  local start = 0
  while true do
    local batch = redis.call('ZRANGE', zkey(pk), start, start + 99)
    for _, c in ipairs(batch) do
      if c ~= u and c ~= avoid then
        local caway, cavoid = unpack(redis.call('HMGET', ukey(c), 'away', 'avoid'))
        if caway == '0' and cavoid ~= u then
          start_session(pk, u, c)
          return
        end
      end
    end
    if #batch < 100 then return end
    start = start + 100
  end
end

-- Puts an idle user in the queue of pool `pk`, tells them, and matches them if possible.
local function queue(u, pk)
  local ticket = redis.call('INCR', P .. ':ticket')
  local position = redis.call('ZCARD', zkey(pk))
  redis.call('ZADD', zkey(pk), ticket, u)
  local est = estimate(pk, position)
  redis.call('HSET', ukey(u), 'state', 'queued', 'pool', pk, 'ticket', ticket, 'since', NOW,
    'told_pos', position, 'told_est', est or '')
  redis.call('HINCRBY', P .. ':stat', 'queued', 1)
  emit(u, { type = 'queued', position = position, estimated_wait_ms = null_or(est) })
  try_match(u)
end

-- Removes a session's own keys.
local function drop_session(sid)
  redis.call('DEL', skey(sid))
  redis.call('HINCRBY', P .. ':stat', 'sessions', -1)
  if MEDIA_PENDING > 0 then
    redis.call('ZREM', P .. ':sessions', sid)
    redis.call('ZREM', P .. ':pending', sid)
  end
  table.insert(out.ended_sessions, sid)
end

-- Undoes a pending session. `leaver` (may be nil) becomes idle and is told `reason`; every
-- other member goes back to its old place in the queue (its ticket), gets an `error` when
-- `message` is given, and is matched again if it can be.
local function cancel_pending(sid, leaver, reason, message)
  local u1, u2 = unpack(redis.call('HMGET', skey(sid), 'u1', 'u2'))
  if not u1 then return end
  drop_session(sid)
  local back = {}
  for _, u in ipairs({ u1, u2 }) do
    local h = ukey(u)
    local state, pk, ticket = unpack(redis.call('HMGET', h, 'state', 'pool', 'ticket'))
    if state == 'pending' then
      if u == leaver then
        redis.call('HSET', h, 'state', 'idle')
        emit(u, { type = 'dequeued', reason = reason })
      else
        redis.call('HSET', h, 'state', 'queued')
        redis.call('ZADD', zkey(pk), ticket, u)
        redis.call('HINCRBY', P .. ':stat', 'queued', 1)
        add_changed(pk)
        if message then emit(u, { type = 'error', code = 'media_unavailable', message = message }) end
        table.insert(back, u)
      end
    end
  end
  for _, u in ipairs(back) do try_match(u) end
end

-- Ends u's session: tells both sides why, then re-queues whoever the rule says.
local function end_session(u, own_reason, own_requeue, peer_reason, peer_requeue)
  local sid, peer = session_of(u)
  drop_session(sid)
  local requeue = {}
  for _, x in ipairs({ { u, own_reason, own_requeue }, { peer, peer_reason, peer_requeue } }) do
    local h = ukey(x[1])
    if redis.call('HGET', h, 'state') == 'session' then
      redis.call('HSET', h, 'state', 'idle')
      if x[3] then table.insert(requeue, x[1]) end
    end
    emit(x[1], { type = 'session_ended', session_id = sid, reason = x[2], requeued = x[3] })
  end
  table.insert(out.ended, own_reason)
  for _, who in ipairs(requeue) do
    queue(who, redis.call('HGET', ukey(who), 'pool'))
  end
end

-- The connection `conn` of u went away: hold the state for the grace period.
local function detach(u, conn)
  local h = ukey(u)
  local c, a, inst = unpack(redis.call('HMGET', h, 'conn', 'away', 'inst'))
  if c ~= conn or a == '1' then return end
  redis.call('HSET', h, 'away', '1')
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
    cancel_pending(redis.call('HGET', h, 'sid'), u, 'timeout', nil)
  else
    redis.call('DEL', h, P .. ':log:' .. u)
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

local function call(_keys, args)
  ARGV = args
  P, OP = ARGV[1], ARGV[2]
  REQUEUE_PEER = ARGV[3] == '1'
  HISTORY_LEN, HISTORY_TTL, GRACE = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  CH, ENTROPY, USER = ARGV[7], ARGV[8], ARGV[9]
  MEDIA_PENDING = tonumber(ARGV[10])
  local t = redis.call('TIME')
  NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  out = { waits = {}, ended = {}, changed = {}, held = false, published = 0, pending = {},
    ended_sessions = {} }
  actor, ref, id_counter = nil, nil, 0

  if OP == 'attach' then
    local conn, inst, token, last = ARGV[11], ARGV[12], ARGV[13], tonumber(ARGV[14]) or 0
    local h = ukey(USER)
    local was_away = false
    if redis.call('EXISTS', h) == 0 then
      redis.call('HSET', h, 'conn', conn, 'inst', inst, 'away', '0', 'state', 'idle',
        'epoch', new_id('r_', 32), 'seq', 0)
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
        try_match(USER)
      end
    end
    return result(attached)
  elseif OP == 'detach' then
    detach(USER, ARGV[11])
    return result()
  elseif OP == 'expire' then
    expire(USER, ARGV[11])
    return result()
  elseif OP == 'enqueue' then
    set_ref(ARGV[13])
    local state = with_user(true)
    if not state then return fail('invalid_state', 'no live connection for this user') end
    if state == 'queued' or state == 'pending' then return fail('invalid_state', 'already queued') end
    if state == 'session' then
      return fail('invalid_state', 'already in a session: skip or end it first')
    end
    redis.call('HSET', ukey(USER), 'prefs', ARGV[11])
    queue(USER, ARGV[12])
    return result()
  elseif OP == 'skip' then
    set_ref(ARGV[11])
    local sid, peer = session_of(USER)
    if not sid then return fail('invalid_state', 'not in a session') end
    redis.call('HSET', ukey(USER), 'avoid', peer)
    redis.call('HSET', ukey(peer), 'avoid', USER)
    end_session(USER, 'skip', true, 'peer_skipped', REQUEUE_PEER)
    return result()
  elseif OP == 'end' then
    set_ref(ARGV[11])
    local state = with_user(true)
    if state == 'queued' then
      dequeue(USER, 'end')
    elseif state == 'pending' then
      cancel_pending(redis.call('HGET', ukey(USER), 'sid'), USER, 'end', nil)
    elseif state == 'session' and session_of(USER) then
      end_session(USER, 'end', false, 'peer_ended', false)
    else
      return fail('invalid_state', 'not queued or in a session')
    end
    return result()
  elseif OP == 'status' then
    local state, pk, ticket, sid = unpack(redis.call('HMGET', ukey(USER), 'state', 'pool', 'ticket', 'sid'))
    if not state then return fail('invalid_state', 'no live connection for this user') end
    local st = { state = state_name(state) }
    if state == 'queued' then
      st.position = redis.call('ZCOUNT', zkey(pk), '-inf', '(' .. ticket)
      st.estimated_wait_ms = estimate(pk, st.position)
    elseif state == 'pending' then
      st.position = 0
    elseif state == 'session' then
      st.session_id = sid
      local u1, h1, h2 = unpack(redis.call('HMGET', skey(sid), 'u1', 'h1', 'h2'))
      if u1 == USER then
        st.role, st.peer = 'offerer', h2
      elseif u1 then
        st.role, st.peer = 'answerer', h1
      end
    end
    return result({ status = st })
  elseif OP == 'refresh' then
    local pk = ARGV[11]
    local users = redis.call('ZRANGE', zkey(pk), 0, -1)
    for i, u in ipairs(users) do
      local position = i - 1
      local est = estimate(pk, position)
      local away, told_pos, told_est = unpack(redis.call('HMGET', ukey(u), 'away', 'told_pos', 'told_est'))
      local old = tonumber(told_est)
      local moved
      if old and est then
        moved = math.abs(old - est) * 5 > math.max(old, est)
      else
        moved = (old == nil) ~= (est == nil)
      end
      if away == '0' and (tonumber(told_pos) ~= position or moved) then
        redis.call('HSET', ukey(u), 'told_pos', position, 'told_est', est or '')
        emit(u, { type = 'queue_update', position = position, estimated_wait_ms = null_or(est) })
      end
    end
    return result()
  elseif OP == 'since' then
    local c, seq = unpack(redis.call('HMGET', ukey(USER), 'conn', 'seq'))
    -- Another connection took over meanwhile (its notice may have been lost with pub/sub).
    if c ~= ARGV[11] then return fail('replaced', 'a newer connection of this user took over') end
    local ok, replay = events_since(USER, tonumber(seq), tonumber(ARGV[12]))
    return result({ resumed = ok, replay = replay })
  elseif OP == 'stats' then
    local queued, sessions = unpack(redis.call('HMGET', P .. ':stat', 'queued', 'sessions'))
    return result({ queued = tonumber(queued) or 0, sessions = tonumber(sessions) or 0 })
  elseif OP == 'tick' then
    -- Instance heartbeat and shared clean-up, run by every instance periodically. USER is the
    -- calling instance; ARGV[11] its heartbeat period, ARGV[12] the dataset epoch it knows, and
    -- ARGV[13] how many users or expiries to handle in this call.
    local inst, period, known, budget = USER, tonumber(ARGV[11]), ARGV[12], tonumber(ARGV[13])
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
    -- Pending sessions whose room never came (the instance setting it up died).
    local stuck = redis.call('ZRANGEBYSCORE', P .. ':pending', '-inf', NOW, 'LIMIT', 0, 100)
    for _, sid in ipairs(stuck) do
      redis.call('ZREM', P .. ':pending', sid)
      cancel_pending(sid, nil, nil, ARGV[14])
    end
    -- Held states from detaches above expire through P:exp, not through a timer of the caller.
    out.held = false
    return result({ epoch = epoch, epoch_changed = known ~= '' and known ~= epoch,
      rejoined = known ~= '' and added == 1,
      cleaned_users = cleaned, expired = #due, dead_instances = #dead })
  elseif OP == 'media_ready' then
    local sid = ARGV[11]
    local u1, u2, h1, h2, pending = unpack(redis.call('HMGET', skey(sid), 'u1', 'u2', 'h1', 'h2', 'pending'))
    if pending ~= '1' then return result({ live = false }) end
    redis.call('HDEL', skey(sid), 'pending')
    redis.call('ZREM', P .. ':pending', sid)
    for _, u in ipairs({ u1, u2 }) do
      local since = tonumber(redis.call('HGET', ukey(u), 'since'))
      table.insert(out.waits, math.max(NOW - since, 0))
      redis.call('HSET', ukey(u), 'state', 'session', 'avoid', '')
    end
    announce(sid, u1, u2, h1, h2, ARGV[12], ARGV[13])
    -- A member whose connection dropped while the room was being made: the other one learns
    -- it right away, as in a running session.
    for _, pair in ipairs({ { u1, u2 }, { u2, u1 } }) do
      if redis.call('HGET', ukey(pair[1]), 'away') == '1' then
        emit(pair[2], { type = 'peer_status', session_id = sid, state = 'reconnecting' })
      end
    end
    return result({ live = true })
  elseif OP == 'media_failed' then
    local sid = ARGV[11]
    if redis.call('HGET', skey(sid), 'pending') == '1' then cancel_pending(sid, nil, nil, ARGV[12]) end
    return result()
  elseif OP == 'media_left' then
    -- ARGV: 11 session, 12 handle of who left ("" for everybody), 13 event id, 14 dedupe ms.
    local sid, left = ARGV[11], ARGV[12]
    if not redis.call('SET', P .. ':seen:' .. ARGV[13], '1', 'NX', 'PX', ARGV[14]) then
      return result({ effect = 'duplicate' })
    end
    local u1, u2, h1, h2, pending = unpack(redis.call('HMGET', skey(sid), 'u1', 'u2', 'h1', 'h2', 'pending'))
    if not u1 or pending == '1' then return result({ effect = 'no_session' }) end
    if left == '' then
      end_session(u1, 'media_disconnected', false, 'media_disconnected', false)
    elseif left == h1 or left == h2 then
      local who = u1
      if left == h2 then who = u2 end
      end_session(who, 'media_disconnected', false, 'media_disconnected', REQUEUE_PEER)
    else
      return result({ effect = 'no_session' })
    end
    return result({ effect = 'ended' })
  elseif OP == 'sessions' then
    local all = redis.call('ZRANGE', P .. ':sessions', 0, -1, 'WITHSCORES')
    local list = {}
    for i = 1, #all, 2 do
      local pending = redis.call('ZSCORE', P .. ':pending', all[i]) ~= false
      table.insert(list, { all[i], tonumber(all[i + 1]), pending })
    end
    return result({ session_list = list })
  elseif OP == 'lease' then
    -- USER is the instance; ARGV[11] the lease name, ARGV[12] its ttl in ms.
    local k = P .. ':lease:' .. ARGV[11]
    local holder = redis.call('GET', k)
    if holder and holder ~= USER then return result({ live = false }) end
    redis.call('SET', k, USER, 'PX', ARGV[12])
    return result({ live = true })
  end
  return fail('internal', 'unknown operation ' .. tostring(OP))
end

redis.register_function('matchgate_@VERSION@', call)

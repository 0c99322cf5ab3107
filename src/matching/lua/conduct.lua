
-- A user's conduct: recent partners (anti-repeat, default target of block and report), quick
-- skips and cooldowns, the enqueue rate, and blocks. Like memory.rs's `Conduct`, it outlives
-- the user's connection state: kept while the user's hash exists, forgotten `conduct_ttl`
-- after it goes (see `keep_conduct` and `forget_conduct_later`).

-- At most this many recent sessions are kept per user (memory.rs: RECENT_KEPT).
local RECENT_KEPT = 16
-- Recent sessions older than the anti-repeat window or this, whichever is longer, go when a
-- new one is added (memory.rs: HOUR): long enough for a `block` or `report` of the last peer.
local RECENT_MIN_AGE = 3600000
local ENQUEUE_WINDOW = 60000

-- The sessions u had, newest first: { session, at (ms it went live), peer } each.
local function recent_sessions(u)
  local t = {}
  for _, entry in ipairs(redis.call('LRANGE', recent_key(u), 0, -1)) do
    local session, at, peer = string.match(entry, '^([^\t]*)\t(%d+)\t(.*)$')
    table.insert(t, { session = session, at = tonumber(at), peer = peer })
  end
  return t
end

-- Remembers that u met `peer` in `session` (live now). Keeps the newest RECENT_KEPT and, as
-- memory.rs does, drops those older than max(anti-repeat window, an hour) only now.
local function remember_partner(u, session, peer)
  local key = recent_key(u)
  if redis.call('LPUSH', key, session .. '\t' .. NOW .. '\t' .. peer) > RECENT_KEPT then
    redis.call('LTRIM', key, 0, RECENT_KEPT - 1)
  end
  local max_age = math.max(R.anti_repeat_window_ms, RECENT_MIN_AGE)
  -- Newest first: nothing to drop unless the oldest is too old.
  local oldest = redis.call('LINDEX', key, -1)
  if NOW - tonumber(string.match(oldest, '^[^\t]*\t(%d+)\t')) <= max_age then return end
  local sessions = recent_sessions(u)
  local keep = #sessions
  while keep > 0 and NOW - sessions[keep].at > max_age do keep = keep - 1 end
  if keep < #sessions then redis.call('LTRIM', key, 0, keep - 1) end
end

-- When u last met each peer within the anti-repeat window.
local function met_within_window(u)
  local t = {}
  if R.anti_repeat_window_ms == 0 then return t end
  for _, m in ipairs(recent_sessions(u)) do
    if NOW - m.at < R.anti_repeat_window_ms and not t[m.peer] then t[m.peer] = m.at end
  end
  return t
end

-- u is (back) in the engine: its conduct and blocks stay while it is.
local function keep_conduct(u)
  flush_hash(conduct_key(u))
  for _, key in ipairs({ recent_key(u), conduct_key(u), blocks_key(u), block_times_key(u) }) do
    redis.call('PERSIST', key)
  end
end

-- u is gone for good: its conduct is forgotten once nothing in it can matter any more, the
-- blocks it made after the block TTL, unless it is back by then.
local function forget_conduct_later(u)
  flush_hash(conduct_key(u))
  for _, key in ipairs({ recent_key(u), conduct_key(u) }) do redis.call('PEXPIRE', key, S.conduct_ttl_ms) end
  for _, key in ipairs({ blocks_key(u), block_times_key(u) }) do redis.call('PEXPIRE', key, R.block_ttl_ms) end
end

-- Whether a (whose hash says `a_has_blocks`) or b blocked the other. The flags spare the set
-- lookups for the many users who never block.
local function blocked(a, a_has_blocks, b, b_has_blocks)
  return (a_has_blocks == '1' and redis.call('SISMEMBER', blocks_key(a), b) == 1)
    or (b_has_blocks == '1' and redis.call('SISMEMBER', blocks_key(b), a) == 1)
end

-- u blocks `peer`: the newest of u's at most max_blocks blocks (the oldest goes first).
-- Returns whether an old block was dropped.
local function add_block(u, peer)
  local set, times = blocks_key(u), block_times_key(u)
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
  set_user(u, 'has_blocks', '1')
  return over > 0
end

-- The cooldown left for u, in ms (0: none).
local function cooldown_left(u)
  local cooldown_until = tonumber(hash_of(conduct_key(u)).cooldown_until) or 0
  return math.max(cooldown_until - NOW, 0)
end

-- A session of `lived` ms ended: a real conversation forgives whatever skipping came before.
local function forgive_skips(u, lived)
  if lived >= R.skip_quick_ms then delete_fields(conduct_key(u), 'quick_skips', 'cooldown_level') end
end

-- Records a skip by u after a session of `lived` ms; returns the cooldown it starts, if any.
local function count_skip(u, lived)
  if lived >= R.skip_quick_ms then return nil end
  local key = conduct_key(u)
  local conduct = hash_of(key)
  local cooldown_until, level, skips = tonumber(conduct.cooldown_until), conduct.cooldown_level,
    conduct.quick_skips
  -- A skip window without a cooldown since the last one: the next one starts short again.
  if cooldown_until and NOW >= cooldown_until + R.skip_window_ms then
    delete_fields(key, 'cooldown_level', 'cooldown_until')
    level = nil
  end
  local quick_skips = {}
  for _, t in ipairs(split(skips, ',')) do
    if NOW - tonumber(t) < R.skip_window_ms then table.insert(quick_skips, t) end
  end
  table.insert(quick_skips, tostring(NOW))
  local cooldown = nil
  if #quick_skips >= R.skip_limit then
    level = (tonumber(level) or 0) + 1
    cooldown = R.skip_cooldowns_ms[math.min(level, #R.skip_cooldowns_ms)]
    set_fields(key, 'cooldown_level', level, 'cooldown_until', NOW + cooldown)
    quick_skips = {}
  end
  set_fields(key, 'quick_skips', table.concat(quick_skips, ','))
  return cooldown
end

-- Counts an enqueue of u against the per-user rate (a one-minute window that starts with its
-- first enqueue); returns the ms to wait when over it.
local function count_enqueue(u)
  local key = conduct_key(u)
  local conduct = hash_of(key)
  local start, count = tonumber(conduct.enqueue_window_start), tonumber(conduct.enqueues)
  if not start or NOW - start >= ENQUEUE_WINDOW then start, count = NOW, 0 end
  if count >= R.enqueue_per_minute then return start + ENQUEUE_WINDOW - NOW + 1 end
  set_fields(key, 'enqueue_window_start', start, 'enqueues', count + 1)
  return nil
end

-- Remembers that u ended a session that lasted `lived` ms (by end, block, or leaving the media
-- room), for count_quick_end.
local function note_quick_end(u, lived)
  if lived < R.skip_quick_ms then set_fields(conduct_key(u), 'quick_end_at', NOW) end
end

-- An enqueue soon after u ended a session quickly: a quick skip by another name (otherwise
-- end and enqueue would cycle partners with no cooldown). Returns the cooldown it starts, if
-- any: the enqueue is then refused.
local function count_quick_end(u)
  local key = conduct_key(u)
  local ended = tonumber(hash_of(key).quick_end_at)
  if not ended then return nil end
  delete_fields(key, 'quick_end_at')
  if NOW - ended >= R.skip_quick_ms then return nil end
  return count_skip(u, 0)
end

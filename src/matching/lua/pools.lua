
-- Pools: who waits where, positions and wait estimates, timers for waiting users.

local function ewma(previous, sample)
  if not previous then return sample end
  previous = tonumber(previous)
  return previous + 0.2 * (sample - previous)
end

-- The wait estimate at `position` in `pool`, in ms rounded to 100, or nil without history.
local function estimate(pool, position)
  local pool_wait, all_wait = unpack(redis.call('HMGET', P .. ':smoothed_waits', pool, '*'))
  local wait = pool_wait or all_wait
  if not wait then return nil end
  local ms = tonumber(wait) * (position + 1)
  return math.floor(ms / 100 + 0.5) * 100
end

local function add_changed(pool)
  for _, p in ipairs(out.changed_pools) do
    if p == pool then return end
  end
  table.insert(out.changed_pools, pool)
end

-- Drops the wait history of a pool nobody waits in, or reports that positions changed.
local function pool_changed(pool)
  if redis.call('ZCARD', pool_key(pool)) == 0 and redis.call('ZCARD', held_key(pool)) == 0 then
    redis.call('HDEL', P .. ':smoothed_waits', pool)
  else
    add_changed(pool)
  end
end

-- Asks the gateway to call `wake` for u after `delay` ms with this timer: kind "relax",
-- "rematch" or "interests" with the queue place's ticket, or "proposal" with the match id.
local function timer(delay, u, kind, ticket_or_match)
  local t = { delay_ms = math.max(delay, 0), user = u, kind = kind }
  if kind == 'proposal' then
    t.match_id = ticket_or_match
  else
    t.ticket = tonumber(ticket_or_match)
  end
  table.insert(out.timers, t)
end

-- Every pool a waiting user is listed in, each once (relaxing a `want.<attribute>` widens the
-- search without changing the pool).
local function pools_of(pool, wider_pools)
  local t, listed = { pool }, { [pool] = true }
  for _, p in ipairs(split(wider_pools, '\n')) do
    if not listed[p] then
      table.insert(t, p)
      listed[p] = true
    end
  end
  return t
end

-- A waiting user's interests (a list), and whether it is open: found by and finding users who
-- share none of its interests (see P:pool). `interests` and `widened` are its hash fields.
local function interests_of(interests, widened)
  local tags = split(interests, '\n')
  return tags, #tags == 0 or widened == '1'
end

-- How many wait in `pool` ahead of `ticket` (all of them when nil), connected or not.
local function ahead(pool, ticket)
  local upto = '+inf'
  if ticket then upto = '(' .. ticket end
  return redis.call('ZCOUNT', pool_key(pool), '-inf', upto) + redis.call('ZCOUNT', held_key(pool), '-inf', upto)
end

-- Lists u at `ticket` in `pool`: connected and open in the open list, else among the others
-- (P:held); connected, also in the list of each of its interests (`tags`).
local function list_in(u, pool, ticket, away, tags, open)
  redis.call('ZADD', P .. ':pools', NOW, pool)
  if away or not open then
    redis.call('ZADD', held_key(pool), ticket, u)
  else
    redis.call('ZADD', pool_key(pool), ticket, u)
  end
  if not away then
    for _, tag in ipairs(tags) do redis.call('ZADD', tag_key(pool, tag), ticket, u) end
  end
end

-- Moves waiting u between the candidate lists and the away ones in its pools (its connection
-- dropped, or it came back).
local function set_away(u, away)
  local h = user(u)
  local pool, wider_pools, ticket, interests, widened = h.pool, h.wider_pools, h.ticket,
    h.interests, h.widened
  if h.state ~= 'queued' then return end
  local tags, open = interests_of(interests, widened)
  for _, p in ipairs(pools_of(pool, wider_pools)) do
    if away then
      redis.call('ZREM', pool_key(p), u)
      for _, tag in ipairs(tags) do redis.call('ZREM', tag_key(p, tag), u) end
    else
      redis.call('ZREM', held_key(p), u)
    end
    list_in(u, p, ticket, away, tags, open)
  end
end

-- Takes a waiting user out of every pool it is listed in: { pool, queued_at, ticket, pools,
-- interests (the field) } or nil when u is not waiting.
local function take_waiting(u)
  local h = user(u)
  local pool, queued_at, ticket, wider_pools, interests = h.pool, h.queued_at, h.ticket,
    h.wider_pools, h.interests
  if h.state ~= 'queued' then return nil end
  local pools = pools_of(pool, wider_pools)
  local tags = split(interests, '\n')
  for _, p in ipairs(pools) do
    redis.call('ZREM', pool_key(p), u)
    redis.call('ZREM', held_key(p), u)
    for _, tag in ipairs(tags) do redis.call('ZREM', tag_key(p, tag), u) end
  end
  -- Only the state changes: the queue fields are read only while the state is `queued` or
  -- `pending`.
  set_user(u, 'state', 'idle')
  increment_field(P .. ':counts', 'queued', -1)
  -- The caller reports the pools as changed (`pools_changed`) once it is done with them.
  return { pool = pool, queued_at = tonumber(queued_at), ticket = tonumber(ticket), pools = pools,
    interests = interests }
end

-- Reports the pools of the users `take_waiting` took (each pool once).
local function pools_changed(...)
  local seen = {}
  for _, waiting in ipairs({ ... }) do
    for _, p in ipairs(waiting.pools) do
      if not seen[p] then
        seen[p] = true
        pool_changed(p)
      end
    end
  end
end

-- Puts a paired user back at its old place (its ticket) in every pool it was listed in, open
-- if it was.
local function restore(u)
  local h = user(u)
  local pool, ticket, wider_pools, away, interests, widened = h.pool, h.ticket, h.wider_pools,
    h.away, h.interests, h.widened
  local tags, open = interests_of(interests, widened)
  for _, p in ipairs(pools_of(pool, wider_pools)) do
    list_in(u, p, ticket, away == '1', tags, open)
    add_changed(p)
  end
  set_user(u, 'state', 'queued')
  increment_field(P .. ':counts', 'queued', 1)
end

-- Takes a waiting user out of the queue and tells them why.
local function dequeue(u, reason)
  local waiting = take_waiting(u)
  if waiting then
    pools_changed(waiting)
    emit(u, { type = 'dequeued', reason = reason })
  end
end

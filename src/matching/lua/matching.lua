
-- Matching: queueing a user, finding the longest-waiting eligible partner, widening a search.

-- Whether waiting u (`me`: its avoid, queued_at, has_blocks) may be matched with c: true yes,
-- false only once the anti-repeat fallback applies (then also when c started waiting), nil
-- never (now).
local function eligible(u, me, met, c)
  if c == u or c == me.avoid then return nil end
  local state, away, avoid, queued_at, has_blocks = unpack(redis.call('HMGET', user_key(c),
    'state', 'away', 'avoid', 'queued_at', 'has_blocks'))
  -- Away users are listed apart (P:held); `away` is checked all the same.
  if state ~= 'queued' or away ~= '0' or avoid == u then return nil end
  if blocked(u, me.has_blocks, c, has_blocks) then return nil end
  if not met[c] then return true end
  local fallback = R.anti_repeat_fallback_ms
  if NOW - me.queued_at >= fallback or NOW - tonumber(queued_at) >= fallback then return true end
  return false, tonumber(queued_at)
end

-- Matches a waiting, connected user with the longest-waiting eligible user in any of its
-- pools. When only recently met users are there, arms the anti-repeat fallback. The walk
-- visits connected waiters only (see P:held) and passes over only those u blocked or was
-- blocked by, avoids or is avoided by, and its recent partners, as in memory.rs.
local function try_match(u)
  local state, away, pool, wider_pools, avoid, queued_at, ticket, fallback_due, has_blocks =
    unpack(redis.call('HMGET', user_key(u), 'state', 'away', 'pool', 'wider_pools', 'avoid',
      'queued_at', 'ticket', 'fallback_due', 'has_blocks'))
  if state ~= 'queued' or away == '1' then return end
  local me = { avoid = avoid, queued_at = tonumber(queued_at), has_blocks = has_blocks }
  local met = met_within_window(u)
  -- held_back: the earliest start of waiting among candidates held back by anti-repeat (the
  -- fallback is due when either side has waited long enough).
  local best, best_ticket, held_back = nil, nil, nil
  for _, p in ipairs(pools_of(pool, wider_pools)) do
    local start, done = 0, false
    while not done do
      local batch = redis.call('ZRANGE', pool_key(p), start, start + 99, 'WITHSCORES')
      for i = 1, #batch, 2 do
        local c, t = batch[i], tonumber(batch[i + 1])
        if best_ticket and t >= best_ticket then done = true break end
        local ok, c_queued_at = eligible(u, me, met, c)
        if ok then
          best, best_ticket, done = c, t, true
          break
        elseif ok == false then
          held_back = math.min(held_back or c_queued_at, c_queued_at)
        end
      end
      if #batch < 200 then done = true end
      start = start + 100
    end
  end
  if best then
    start_session(u, best)
  elseif held_back then
    -- `fallback_due`: when the armed fallback timer is due. A timer is lost with its
    -- instance, so one long overdue is armed again here.
    local due = math.min(me.queued_at, held_back) + R.anti_repeat_fallback_ms
    local armed = tonumber(fallback_due) or 0
    if armed == 0 or armed + 1000 < NOW then
      redis.call('HSET', user_key(u), 'fallback_due', due)
      timer(due - NOW, u, 'rematch', ticket)
    end
  end
end

-- Puts an idle user in the queue of `pool`, tells them, and matches them if possible.
-- `widens`: whether the user's preferences can widen (relaxation timers).
local function queue(u, pool, widens)
  local ticket = redis.call('INCR', P .. ':ticket')
  local position = ahead(pool, nil)
  local user_hash = user_key(u)
  -- A user re-queued while away (the peer of a skipper, say) waits among the away ones.
  list_in(u, pool, ticket, redis.call('HGET', user_hash, 'away') == '1')
  local estimated_wait = estimate(pool, position)
  redis.call('HSET', user_hash, 'state', 'queued', 'pool', pool, 'wider_pools', '', 'fallback_due', '0',
    'ticket', ticket, 'queued_at', NOW, 'told_position', position, 'told_estimate', estimated_wait or '')
  redis.call('HINCRBY', P .. ':counts', 'queued', 1)
  if widens then timer(R.relax_after_ms, u, 'relax', ticket) end
  emit(u, { type = 'queued', position = position, estimated_wait_ms = null_or(estimated_wait) })
  try_match(u)
end

-- Puts a user who was matched back at the tail of its pool, with the preferences it had.
local function requeue(u)
  local pool, relaxed_pools = unpack(redis.call('HMGET', user_key(u), 'pool', 'relaxed_pools'))
  queue(u, pool, (relaxed_pools or '') ~= '')
end

-- Widens the search of waiting u (queue place `ticket`) by one relaxation step.
local function relax(u, ticket)
  local user_hash = user_key(u)
  local state, current, pool, wider_pools, relaxed_pools, relaxed_prefs, away = unpack(
    redis.call('HMGET', user_hash, 'state', 'ticket', 'pool', 'wider_pools', 'relaxed_pools',
      'relaxed_prefs', 'away'))
  if tonumber(current) ~= ticket then return end
  -- Paired meanwhile: if the match is undone, the search goes on widening.
  if state == 'pending' then timer(R.relax_after_ms, u, 'relax', ticket) end
  if state ~= 'queued' then return end
  local done, steps = split(wider_pools, '\n'), split(relaxed_pools, '\n')
  local level = #done + 1
  if level > #steps then return end
  local wider = steps[level]
  list_in(u, wider, ticket, away == '1')
  table.insert(done, wider)
  local position = ahead(pool, ticket)
  local estimated_wait = estimate(pool, position)
  redis.call('HSET', user_hash, 'wider_pools', table.concat(done, '\n'), 'told_position', position,
    'told_estimate', estimated_wait or '')
  emit(u, { type = 'queue_update', position = position, estimated_wait_ms = null_or(estimated_wait),
    widened_to = cjson.decode(relaxed_prefs)[level] })
  if level < #steps then timer(R.relax_after_ms, u, 'relax', ticket) end
  try_match(u)
end


-- Matching: queueing a user, finding the longest-waiting eligible partner, widening a search.

-- A JSON text of the user hash (attributes, a want) decoded; "" (or nil) is none.
local function decoded(text)
  if text == nil or text == '' then return {} end
  return cjson.decode(text)
end

-- Whether `want` holds for a peer with `attributes` (both decoded): every constrained
-- attribute is present with one of the wanted values (attributes.rs: want_holds).
local function want_holds(want, attributes)
  for name, values in pairs(want) do
    local value, found = attributes[name], false
    for _, v in ipairs(values) do
      if v == value then
        found = true
        break
      end
    end
    if not found then return false end
  end
  return true
end

-- Whether waiting u (`me`: its avoid, queued_at, has_blocks, want and attributes) may be
-- matched with c, listed at ticket `t` in a list that already makes them share an interest or
-- both open: true yes, false only once the anti-repeat fallback applies (then also when c
-- started waiting), nil never (now), 'stale' for an entry that is not c's queue place.
local function eligible(u, me, met, c, t)
  if c == u or c == me.avoid then return nil end
  local h = user(c)
  local state, away, avoid, queued_at, has_blocks, ticket, want, attributes = h.state, h.away,
    h.avoid, h.queued_at, h.has_blocks, h.ticket, h.want, h.attributes
  if state ~= 'queued' or tonumber(ticket) ~= t then return 'stale' end
  -- Away users are listed apart (P:held); `away` is checked all the same.
  if away ~= '0' or avoid == u then return nil end
  if blocked(u, me.has_blocks, c, has_blocks) then return nil end
  -- Wants both ways, decoded only when a side has any.
  if me.want and not want_holds(me.want, decoded(attributes)) then return nil end
  if (want or '') ~= '' then
    me.attributes = me.attributes or decoded(me.attributes_text)
    if not want_holds(cjson.decode(want), me.attributes) then return nil end
  end
  if not met[c] then return true end
  local fallback = R.anti_repeat_fallback_ms
  if NOW - me.queued_at >= fallback or NOW - tonumber(queued_at) >= fallback then return true end
  return false, tonumber(queued_at)
end

-- Matches a waiting, connected user with the longest-waiting eligible user in any of its
-- pools. When only recently met users are there, arms the anti-repeat fallback. In each pool
-- the search walks the list of each of u's interests, and the open list if u is open, so it
-- visits only users who share an interest with u or are open like u, each at most once. It
-- visits connected waiters only (see P:held) and passes over only those u blocked or was
-- blocked by, avoids or is avoided by, its recent partners, and those failing a want either
-- way, as in memory.rs.
local function try_match(u)
  local h = user(u)
  local pool, wider_pools, ticket, interests, widened, want = h.pool, h.wider_pools, h.ticket,
    h.interests, h.widened, h.want
  if h.state ~= 'queued' or h.away == '1' then return end
  local me = { avoid = h.avoid, queued_at = tonumber(h.queued_at), has_blocks = h.has_blocks,
    attributes_text = h.attributes }
  if (want or '') ~= '' then me.want = cjson.decode(want) end
  local tags, open = interests_of(interests, widened)
  local met = met_within_window(u)
  -- held_back: the earliest start of waiting among candidates held back by anti-repeat (the
  -- fallback is due when either side has waited long enough).
  local best, best_ticket, held_back = nil, nil, nil
  -- Candidates already judged (one user may be in several of the lists).
  local visited = {}
  for _, p in ipairs(pools_of(pool, wider_pools)) do
    local lists = {}
    if open then lists[1] = pool_key(p) end
    for _, tag in ipairs(tags) do table.insert(lists, tag_key(p, tag)) end
    for _, list in ipairs(lists) do
      -- A small first window: the longest waiting candidate is usually eligible, and every
      -- member read costs two strings passed from Redis to Lua.
      local start, size, done = 0, 4, false
      while not done do
        local batch = redis.call('ZRANGE', list, start, start + size - 1, 'WITHSCORES')
        local dropped = 0
        for i = 1, #batch, 2 do
          local c, t = batch[i], tonumber(batch[i + 1])
          if best_ticket and t >= best_ticket then done = true break end
          if not visited[c] then
            local ok, c_queued_at = eligible(u, me, met, c, t)
            if ok == 'stale' then
              -- c's current place (if any) is elsewhere: judge c there.
              redis.call('ZREM', list, c)
              dropped = dropped + 1
            else
              visited[c] = true
            end
            if ok == true then
              best, best_ticket, done = c, t, true
              break
            elseif ok == false then
              held_back = math.min(held_back or c_queued_at, c_queued_at)
            end
          end
        end
        if #batch < 2 * size then done = true end
        start = start + size - dropped
        size = 100
      end
    end
  end
  if best then
    start_session(u, best)
  elseif held_back then
    -- `fallback_due`: when the armed fallback timer is due. A timer is lost with its
    -- instance, so one long overdue is armed again here.
    local due = math.min(me.queued_at, held_back) + R.anti_repeat_fallback_ms
    local armed = tonumber(h.fallback_due) or 0
    if armed == 0 or armed + 1000 < NOW then
      set_user(u, 'fallback_due', due)
      timer(due - NOW, u, 'rematch', ticket)
    end
  end
end

-- The `want` of relaxation level `level` (0: the full preferences) from the `wants` field, as
-- JSON text ("": no constraint).
local function want_at(wants, level)
  if (wants or '') == '' then return '' end
  return cjson.decode(wants)[level + 1]
end

-- Puts an idle user in the queue of `pool` with the preferences its hash holds (see
-- `enqueue`), tells them, and matches them if possible. A user with interests starts not open
-- and, unless `interests_only`, widens after the interests wait.
local function queue(u, pool)
  local ticket = redis.call('INCR', P .. ':ticket')
  local position = ahead(pool, nil)
  local h = user(u)
  local away, relaxed_pools, interests, interests_only, wants = h.away, h.relaxed_pools,
    h.interests, h.interests_only, h.wants
  local tags, open = interests_of(interests, '0')
  -- A user re-queued while away (the peer of a skipper, say) waits among the away ones.
  list_in(u, pool, ticket, away == '1', tags, open)
  local estimated_wait = estimate(pool, position)
  set_user(u, 'state', 'queued', 'pool', pool, 'wider_pools', '', 'fallback_due', '0',
    'ticket', ticket, 'queued_at', NOW, 'told_position', position, 'told_estimate', estimated_wait or '',
    'widened', '0', 'want', want_at(wants, 0))
  increment_field(P .. ':counts', 'queued', 1)
  if (relaxed_pools or '') ~= '' then timer(R.relax_after_ms, u, 'relax', ticket) end
  if not open and interests_only ~= '1' then timer(R.interests_wait_ms, u, 'interests', ticket) end
  emit(u, { type = 'queued', position = position, estimated_wait_ms = null_or(estimated_wait) })
  try_match(u)
end

-- Puts a user who was matched back at the tail of its pool, with the preferences it had.
local function requeue(u)
  queue(u, user(u).pool)
end

-- Widens the search of waiting u (queue place `ticket`) by one relaxation step.
local function relax(u, ticket)
  local h = user(u)
  local state, current, pool, wider_pools, relaxed_pools, relaxed_prefs, away, interests, widened,
    wants = h.state, h.ticket, h.pool, h.wider_pools, h.relaxed_pools, h.relaxed_prefs, h.away,
    h.interests, h.widened, h.wants
  if tonumber(current) ~= ticket then return end
  -- Paired meanwhile: if the match is undone, the search goes on widening.
  if state == 'pending' then timer(R.relax_after_ms, u, 'relax', ticket) end
  if state ~= 'queued' then return end
  local done, steps = split(wider_pools, '\n'), split(relaxed_pools, '\n')
  local level = #done + 1
  if level > #steps then return end
  local wider = steps[level]
  -- A step that drops only a `want` constraint keeps the pool: u is listed there already.
  local listed = false
  for _, p in ipairs(pools_of(pool, wider_pools)) do listed = listed or p == wider end
  if not listed then
    local tags, open = interests_of(interests, widened)
    list_in(u, wider, ticket, away == '1', tags, open)
  end
  table.insert(done, wider)
  local position = ahead(pool, ticket)
  local estimated_wait = estimate(pool, position)
  set_user(u, 'wider_pools', table.concat(done, '\n'), 'told_position', position,
    'told_estimate', estimated_wait or '', 'want', want_at(wants, level))
  emit(u, { type = 'queue_update', position = position, estimated_wait_ms = null_or(estimated_wait),
    widened_to = cjson.decode(relaxed_prefs)[level] })
  if level < #steps then timer(R.relax_after_ms, u, 'relax', ticket) end
  try_match(u)
end

-- The interests wait of waiting u (queue place `ticket`) passed: u becomes open in every pool
-- it is listed in (now and in wider pools later) and searches beyond its interests.
local function widen_interests(u, ticket)
  local h = user(u)
  local state, current, pool, wider_pools, away, interests, interests_only, widened = h.state,
    h.ticket, h.pool, h.wider_pools, h.away, h.interests, h.interests_only, h.widened
  if tonumber(current) ~= ticket then return end
  -- Paired meanwhile: if the match is undone, the wait goes on.
  if state == 'pending' then timer(R.interests_wait_ms, u, 'interests', ticket) end
  local _, open = interests_of(interests, widened)
  if state ~= 'queued' or open or interests_only == '1' then return end
  -- An away user moves to the open lists when it reattaches (set_away).
  if away ~= '1' then
    for _, p in ipairs(pools_of(pool, wider_pools)) do
      redis.call('ZREM', held_key(p), u)
      redis.call('ZADD', pool_key(p), ticket, u)
    end
  end
  local position = ahead(pool, ticket)
  local estimated_wait = estimate(pool, position)
  set_user(u, 'widened', '1', 'told_position', position, 'told_estimate',
    estimated_wait or '')
  emit(u, { type = 'queue_update', position = position, estimated_wait_ms = null_or(estimated_wait),
    interests_widened = true })
  try_match(u)
end

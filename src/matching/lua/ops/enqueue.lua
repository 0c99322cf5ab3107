
-- enqueue {user, ref?, pool, relaxed_pools: [pool of each relaxation step], relaxed_prefs:
-- JSON text of the preferences of each step}: the user waits for a match.
OPS.enqueue = function()
  act_for_user()
  local state = state_of_user()
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
  local relaxed_pools = table.concat(A.relaxed_pools, '\n')
  redis.call('HSET', user_key(USER), 'relaxed_pools', relaxed_pools, 'relaxed_prefs', A.relaxed_prefs)
  queue(USER, A.pool, relaxed_pools ~= '')
  return result()
end

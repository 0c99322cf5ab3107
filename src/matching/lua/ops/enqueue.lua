
-- enqueue {user, ref?, pool, relaxed_pools: [pool of each relaxation step], relaxed_prefs:
-- JSON text of the preferences of each step, interests: [tag], interests_only, attributes?:
-- JSON text of the token's attributes, wants?: [JSON text of the `want` of each relaxation
-- level, level 0 first; "" for none] (absent when the preferences want nothing)}: the user
-- waits for a match.
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
  local wants = ''
  if A.wants then wants = cjson.encode(A.wants) end
  -- Kept for a re-queue after a session (see `requeue`).
  set_user(USER, 'relaxed_pools', relaxed_pools, 'relaxed_prefs', A.relaxed_prefs,
    'interests', table.concat(A.interests, '\n'), 'interests_only', A.interests_only and '1' or '0',
    'attributes', A.attributes or '', 'wants', wants)
  queue(USER, A.pool)
  return result()
end


-- wake {user, timer: {kind: relax, rematch or interests, ticket} or {kind: proposal,
-- match_id}}: a timer an earlier outcome armed went off.
OPS.wake = function()
  local t = A.timer
  if t.kind == 'relax' then
    relax(USER, t.ticket)
  elseif t.kind == 'rematch' then
    local state, ticket = unpack(redis.call('HMGET', user_key(USER), 'state', 'ticket'))
    if state == 'queued' and tonumber(ticket) == t.ticket then
      redis.call('HSET', user_key(USER), 'fallback_due', '0')
      try_match(USER)
    end
  elseif t.kind == 'interests' then
    widen_interests(USER, t.ticket)
  elseif t.kind == 'proposal' then
    if redis.call('HGET', session_key(t.match_id), 'phase') == 'proposed' then proposal_expired(t.match_id) end
  end
  return result()
end

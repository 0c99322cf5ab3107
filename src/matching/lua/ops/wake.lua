
-- wake {user, timer: {kind: relax, rematch or interests, ticket} or {kind: proposal,
-- match_id}}: a timer an earlier outcome armed went off.
OPS.wake = function()
  local t = A.timer
  if t.kind == 'relax' then
    relax(USER, t.ticket)
  elseif t.kind == 'rematch' then
    local h = user(USER)
    if h.state == 'queued' and tonumber(h.ticket) == t.ticket then
      set_user(USER, 'fallback_due', '0')
      try_match(USER)
    end
  elseif t.kind == 'interests' then
    widen_interests(USER, t.ticket)
  elseif t.kind == 'proposal' then
    if hash_of(session_key(t.match_id)).phase == 'proposed' then proposal_expired(t.match_id) end
  end
  return result()
end

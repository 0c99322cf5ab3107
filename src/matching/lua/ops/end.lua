
-- end {user, ref?}: leaves the queue, the match not yet live, or the session.
OPS['end'] = function()
  act_for_user()
  local state = state_of_user()
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


-- status {user}. Reply: {state, position?, estimated_wait_ms?, session_id?, peer?, role?}.
OPS.status = function()
  local status = status_of(USER)
  if not status then return fail('invalid_state', 'no live connection for this user') end
  return result(status)
end

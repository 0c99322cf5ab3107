
-- since {user, connection, last_seq}: the user's events after `last_seq`, to catch a
-- connection up after pub/sub lost messages. Reply: {resumed, replay: [{seq, frame}]}.
OPS.since = function()
  local h = user(USER)
  local connection, last_seq = h.connection, h.last_seq
  -- Another connection took over meanwhile (its notice may have been lost with pub/sub).
  if connection ~= A.connection then return fail('replaced', 'a newer connection of this user took over') end
  local resumed, replay = events_since(USER, tonumber(last_seq), A.last_seq)
  return result({ resumed = resumed, replay = replay })
end

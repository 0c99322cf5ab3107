
-- accept {user, match_id}: accept phase; when both accepted, the match goes on (to its room,
-- or live).
OPS.accept = function()
  if not state_of_user() then return fail('invalid_state', 'no live connection for this user') end
  local match_id = A.match_id
  local i = proposal_member(USER, match_id)
  if not i then return fail('invalid_state', 'no such proposal open') end
  local session_hash = session_key(match_id)
  set_fields(session_hash, MEMBERS[i].accepted, '1')
  local fields = hash_of(session_hash)
  if fields.offerer_accepted == '1' and fields.answerer_accepted == '1' then
    if MEDIA_PENDING > 0 then await_room(match_id) else go_live(match_id, nil, nil) end
  end
  return result()
end

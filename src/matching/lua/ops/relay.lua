
-- relay {user, kind: signal or chat, json}: passes a message to the peer of the user's live
-- session, not logged. `json`, checked and encoded by the gateway, is the payload object as
-- the client sent it, or the chat text as a string literal.
OPS.relay = function()
  local session, peer = session_of(USER)
  if not session then return fail('invalid_state', 'not in a session') end
  local frame
  if A.kind == 'signal' then
    frame = '{"type":"signal","session_id":"' .. session .. '","payload":' .. A.json .. '}'
  else
    frame = '{"type":"chat","session_id":"' .. session .. '","text":' .. A.json .. ',"sent_at_ms":' .. NOW .. '}'
  end
  -- Not logged: a peer who is away misses it.
  local h = user(peer)
  local instance, away = h.instance, h.away
  if instance and away == '0' then publish(instance, 'F' .. peer .. '\n0\n' .. frame) end
  return result()
end


-- media_ready {session, offerer_media, answerer_media (JSON text each)}: the room of a
-- pending session is ready. Reply: {went_live}: false when the session is no longer pending.
OPS.media_ready = function()
  if hash_of(session_key(A.session)).phase ~= 'pending' then
    return result({ went_live = false })
  end
  go_live(A.session, A.offerer_media, A.answerer_media)
  return result({ went_live = true })
end

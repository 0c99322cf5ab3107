
-- media_failed {session, message}: no room for a pending session; both members go back to
-- their places and get a `media_unavailable` error with `message`.
OPS.media_failed = function()
  media_failed(A.session, A.message)
  return result()
end

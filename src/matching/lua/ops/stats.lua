
-- stats {}. Reply: {queued, sessions} over the whole deployment.
OPS.stats = function()
  local counts = hash_of(P .. ':counts')
  return result({ queued = tonumber(counts.queued) or 0, sessions = tonumber(counts.sessions) or 0 })
end

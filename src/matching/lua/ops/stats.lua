
-- stats {}. Reply: {queued, sessions} over the whole deployment.
OPS.stats = function()
  local queued, sessions = unpack(redis.call('HMGET', P .. ':counts', 'queued', 'sessions'))
  return result({ queued = tonumber(queued) or 0, sessions = tonumber(sessions) or 0 })
end

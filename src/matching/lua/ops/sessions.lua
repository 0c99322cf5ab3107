
-- sessions {}: every session, for the sweep that matches them against the media server's
-- rooms. Reply: {sessions: [{session_id, matched_at_ms, pending}]}.
OPS.sessions = function()
  -- Many sessions, each read once: from Redis, with this call's changes written first.
  flush_hashes()
  local all = redis.call('ZRANGE', P .. ':media_sessions', 0, -1, 'WITHSCORES')
  local sessions = {}
  for i = 1, #all, 2 do
    local pending = redis.call('HGET', session_key(all[i]), 'phase') ~= 'live'
    table.insert(sessions, { session_id = all[i], matched_at_ms = tonumber(all[i + 1]), pending = pending })
  end
  return result({ sessions = sessions })
end

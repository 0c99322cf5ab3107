
-- Events: each user's log (what resume replays) and delivery to the user's instance.

local function publish(instance, payload)
  redis.call('PUBLISH', CHANNELS .. instance, payload)
  out.published = out.published + 1
end

-- Appends an event to the user's log (if it carries a seq) and sends it to their instance.
-- `raw`, if given, is one more member ("name":<JSON>) spliced into the frame as it is.
local function emit(u, event, raw)
  local user_hash = user_key(u)
  local instance, away = unpack(redis.call('HMGET', user_hash, 'instance', 'away'))
  if not instance then return end
  if ref and u == actor then
    event['ref'] = ref
    ref = nil
  end
  local seq = 0
  if event['type'] ~= 'queue_update' and event['type'] ~= 'error' then
    seq = redis.call('HINCRBY', user_hash, 'last_seq', 1)
    event['seq'] = seq
  end
  local text = cjson.encode(event)
  if raw then text = string.sub(text, 1, -2) .. ',' .. raw .. '}' end
  if seq > 0 then
    local log = log_key(u)
    -- Trimmed in batches: the log may briefly hold a few more than history_len entries.
    if redis.call('RPUSH', log, seq .. ' ' .. NOW .. ' ' .. text) > S.history_len + 16 then
      redis.call('LTRIM', log, -S.history_len, -1)
    end
    redis.call('PEXPIRE', log, S.history_ttl_ms)
  end
  if away ~= '1' then
    publish(instance, 'F' .. u .. '\n' .. seq .. '\n' .. text)
  end
end

-- The logged events of u after `last` ({ seq = .., frame = .. } each), if the log still
-- holds all of them; `last_seq` is u's latest seq.
local function events_since(u, last_seq, last)
  if last > last_seq then return false, {} end
  if last == last_seq then return true, {} end
  local entries = redis.call('LRANGE', log_key(u), 0, -1)
  if #entries == 0 or tonumber(string.match(entries[1], '^(%d+) ')) > last + 1 then
    return false, {}
  end
  local replay = {}
  for _, entry in ipairs(entries) do
    local seq, frame = string.match(entry, '^(%d+) %d+ (.*)$')
    seq = tonumber(seq)
    if seq > last then table.insert(replay, { seq = seq, frame = frame }) end
  end
  return true, replay
end

-- The state as clients name it.
local function state_name(state)
  if state == 'session' then return 'in_session' end
  -- The client learns of the match only with `matched`.
  if state == 'pending' then return 'queued' end
  return state
end

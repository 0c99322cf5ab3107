
-- Events: each user's log (what resume replays) and delivery to the user's instance.

-- What the call (a whole batch of operations) sends each instance, published once per
-- instance when the call ends (see `publish_all`): the notices by instance, and the instances
-- in the order they were first sent something. One PUBLISH per instance and call rather than
-- one per frame: the publications were most of a match's Redis time.
local outgoing, outgoing_order

local function start_publishing()
  outgoing, outgoing_order = {}, {}
end

-- Queues a notice ("F..." frame, "K..." kick; see keys.lua) for `instance`.
local function publish(instance, notice)
  table.insert(entry_of(outgoing, outgoing_order, instance), notice)
end

-- Publishes what the call queued, in order, one message per instance: a lone notice as it is,
-- several as "M" and then, for each one, its length in bytes, "\n" and the notice (see
-- keys.lua). Returns how many messages went out.
local function publish_all()
  for _, instance in ipairs(outgoing_order) do
    local notices = outgoing[instance]
    local payload = notices[1]
    if #notices > 1 then
      local parts = { 'M' }
      for _, notice in ipairs(notices) do
        parts[#parts + 1] = #notice .. '\n' .. notice
      end
      payload = table.concat(parts)
    end
    redis.call('PUBLISH', CHANNELS .. instance, payload)
  end
  return #outgoing_order
end

-- Appends an event to the user's log (if it carries a seq) and sends it to their instance.
-- `raw`, if given, is one more member ("name":<JSON>) spliced into the frame as it is.
local function emit(u, event, raw)
  local h = user(u)
  local instance, away = h.instance, h.away
  if not instance then return end
  if ref and u == actor then
    event['ref'] = ref
    ref = nil
  end
  local seq = 0
  if event['type'] ~= 'queue_update' and event['type'] ~= 'error' then
    seq = increment_field(user_key(u), 'last_seq', 1)
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


-- The one function of the library: sets up the call (settings, time, the p2p media) and runs
-- the batch of operations it names, each as its own step, then publishes what they sent. A table of operations rather than one function with a branch each: a
-- Lua 5.1 function may refer to at most 60 enclosing locals, and each operation refers only
-- to the helpers it uses.

-- The settings text last decoded (kept across calls, like every local of the library).
local SETTINGS_TEXT

-- Decodes an instance's settings; they change only when another instance (or a restarted
-- one) calls.
local function read_settings(text)
  S = cjson.decode(text)
  R = S.rules
  P = key_root(S.key_prefix)
  CHANNELS = S.channel_prefix
  -- How long a user's conduct is kept once the user is gone (memory.rs: forget_later): the
  -- anti-repeat window, an hour for `block` and `report` defaults, a skip window after the
  -- longest cooldown.
  local longest = 0
  for _, c in ipairs(R.skip_cooldowns_ms) do longest = math.max(longest, c) end
  S.conduct_ttl_ms = math.max(R.anti_repeat_window_ms, RECENT_MIN_AGE, longest + R.skip_window_ms)
  SETTINGS_TEXT = text
end

-- Runs one operation of the batch: `name` with the JSON arguments `args`. Its state (A,
-- USER, NOW, out, actor, ref, ids) is its own; what it publishes joins the batch's.
local function run(name, args, batch_now)
  local operation = OPS[name]
  if not operation then return fail('internal', 'unknown operation ' .. tostring(name)) end
  A = cjson.decode(args)
  -- An absent argument and a JSON null both read as nil.
  for key, value in pairs(A) do
    if value == cjson.null then A[key] = nil end
  end
  USER = A.user or A.instance
  NOW = A.now_ms or batch_now
  out = { waits = {}, started = {}, closed = {}, changed_pools = {}, held = false, pending = {},
    ended_sessions = {}, timers = {} }
  actor, ref, id_counter = nil, nil, 0
  -- A bug in one operation (a Lua error) answers it alone: the batch goes on, as separate
  -- calls would (what the operation wrote before the error stays, as it would alone).
  local ok, reply = pcall(operation)
  if ok then return reply end
  if type(reply) == 'table' then reply = reply.err end
  return fail('internal', tostring(reply))
end

local function call(_keys, argv)
  if argv[1] ~= SETTINGS_TEXT then read_settings(argv[1]) end
  local t = redis.call('TIME')
  local batch_now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  MEDIA_PENDING, P2P_KEY, ICE = 0, nil, nil
  if S.media.mode == 'livekit' then
    MEDIA_PENDING = S.media.pending_ms
  else
    P2P_KEY = P .. ':p2p:' .. S.media.instance
  end
  local replies = {}
  start_hashes()
  -- Checked before anything changes: any operation may make a match. The gateway writes the
  -- configuration and sends the batch again.
  if P2P_KEY and argv[2] ~= 'p2p_config' and not load_p2p() then
    local missing = fail('p2p_config_missing', 'this instance has not written its p2p configuration')
    for i = 2, #argv, 2 do replies[#replies + 1] = missing end
    return { 0, replies }
  end
  start_publishing()
  start_counting()
  for i = 2, #argv, 2 do
    replies[#replies + 1] = run(argv[i], argv[i + 1], batch_now)
  end
  flush_hashes()
  finish_counting()
  return { publish_all(), replies }
end

redis.register_function('matchgate_@VERSION@', call)

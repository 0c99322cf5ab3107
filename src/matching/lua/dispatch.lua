
-- The one function of the library: sets up the call (settings, arguments, time) and runs the
-- operation it names. A table of operations rather than one function with a branch each: a
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

local function call(_keys, argv)
  local operation = OPS[argv[1]]
  if not operation then return fail('internal', 'unknown operation ' .. tostring(argv[1])) end
  if argv[2] ~= SETTINGS_TEXT then read_settings(argv[2]) end
  A = cjson.decode(argv[3])
  -- An absent argument and a JSON null both read as nil.
  for name, value in pairs(A) do
    if value == cjson.null then A[name] = nil end
  end
  USER = A.user or A.instance
  if A.now_ms then
    NOW = A.now_ms
  else
    local t = redis.call('TIME')
    NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  MEDIA_PENDING, P2P_KEY, ICE = 0, nil, nil
  if S.media.mode == 'livekit' then
    MEDIA_PENDING = S.media.pending_ms
  else
    P2P_KEY = P .. ':p2p:' .. S.media.instance
  end
  out = { waits = {}, started = {}, closed = {}, changed_pools = {}, held = false, published = 0, pending = {},
    ended_sessions = {}, timers = {} }
  actor, ref, id_counter = nil, nil, 0
  -- Checked before anything changes: any operation may make a match.
  if P2P_KEY and argv[1] ~= 'p2p_config' and not load_p2p() then
    return fail('p2p_config_missing', 'this instance has not written its p2p configuration')
  end
  return operation()
end

redis.register_function('matchgate_@VERSION@', call)

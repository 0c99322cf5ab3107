
-- Media mode p2p: the ICE servers each member's `matched` lists, with TURN credentials minted
-- in the matching step, as p2p.rs mints them for the in-memory engine.

-- The ICE servers of this instance's matches, or false when the instance must write them
-- first (at its start, after they expired, or after Redis lost its data).
local function load_p2p()
  local secret, credential_ttl_s, stun, turn = unpack(redis.call('HMGET', P2P_KEY, 'secret',
    'credential_ttl_s', 'stun', 'turn'))
  if not credential_ttl_s then return false end
  ICE = { secret = secret, credential_ttl_s = tonumber(credential_ttl_s), stun = stun, turn = turn }
  return true
end

-- The key blocks of HMAC-SHA1 for the last secret seen (kept across calls, like the settings).
local PADS_FOR, INNER_PAD, OUTER_PAD

-- HMAC-SHA1 (RFC 2104) of msg under key, as 20 bytes.
local function hmac_sha1(key, msg)
  if key ~= PADS_FOR then
    local key_bytes = key
    if #key_bytes > 64 then key_bytes = bytes_of_hex(redis.sha1hex(key_bytes)) end
    local inner, outer = {}, {}
    for n = 1, 64 do
      local b = string.byte(key_bytes, n) or 0
      inner[n] = string.char(bit.bxor(b, 0x36))
      outer[n] = string.char(bit.bxor(b, 0x5c))
    end
    PADS_FOR, INNER_PAD, OUTER_PAD = key, table.concat(inner), table.concat(outer)
  end
  return bytes_of_hex(redis.sha1hex(OUTER_PAD .. bytes_of_hex(redis.sha1hex(INNER_PAD .. msg))))
end

-- The p2p media JSON of the member with handle handle: the STUN entry, and the TURN entry with
-- credentials in the TURN REST scheme (username "<unix expiry>:<handle>", credential
-- base64(HMAC-SHA1(secret, username))).
local function p2p_media(handle)
  local servers = {}
  if ICE.stun ~= '' then servers[1] = ICE.stun end
  if ICE.turn ~= '' then
    local username = (math.floor(NOW / 1000) + ICE.credential_ttl_s) .. ':' .. handle
    servers[#servers + 1] = '{"urls":' .. ICE.turn .. ',"username":"' .. username ..
      '","credential":"' .. base64(hmac_sha1(ICE.secret, username), BASE64, true) .. '"}'
  end
  return '{"provider":"p2p","ice_servers":[' .. table.concat(servers, ',') .. ']}'
end


-- p2p_config {instance, secret, credential_ttl_s, stun, turn (each "" when not configured),
-- keep_ms}: writes the ICE servers of the instance's matches (see p2p.lua), kept `keep_ms`.
-- The TURN secret is an argument of this call only.
OPS.p2p_config = function()
  redis.call('HSET', P2P_KEY, 'secret', A.secret, 'credential_ttl_s', A.credential_ttl_s,
    'stun', A.stun, 'turn', A.turn)
  redis.call('PEXPIRE', P2P_KEY, A.keep_ms)
  return result()
end

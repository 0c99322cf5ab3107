
-- lease {instance, name, ttl_ms}: whether the instance holds the lease `name` (taking or
-- extending it). Reply: {held}.
OPS.lease = function()
  local lease_key = P .. ':lease:' .. A.name
  local holder = redis.call('GET', lease_key)
  if holder and holder ~= USER then return result({ held = false }) end
  redis.call('SET', lease_key, USER, 'PX', A.ttl_ms)
  return result({ held = true })
end


-- overview {max_pools}: the admin API's stats over the whole deployment. Reply: {pools:
-- [{pool, waiting, estimated_wait_ms}] (at most max_pools, the latest listed in first; empty
-- ones leave P:pools), instances: [{instance, connections}], sessions, matches_last_minute,
-- matches_this_minute}.
OPS.overview = function()
  local pools = {}
  for _, pool in ipairs(redis.call('ZREVRANGE', P .. ':pools', 0, A.max_pools - 1)) do
    local waiting = ahead(pool, nil)
    if waiting == 0 then
      redis.call('ZREM', P .. ':pools', pool)
    else
      table.insert(pools, { pool = pool, waiting = waiting,
        estimated_wait_ms = null_or(estimate(pool, waiting)) })
    end
  end
  local instances = {}
  for _, instance in ipairs(redis.call('ZRANGE', P .. ':instances', 0, -1)) do
    table.insert(instances, { instance = instance,
      connections = redis.call('SCARD', instance_users_key(instance)) })
  end
  local minute = math.floor(NOW / 60000)
  local last, this = unpack(redis.call('MGET', P .. ':matches:' .. (minute - 1),
    P .. ':matches:' .. minute))
  return result({ pools = pools, instances = instances,
    sessions = tonumber(hash_of(P .. ':counts').sessions) or 0,
    matches_last_minute = tonumber(last) or 0, matches_this_minute = tonumber(this) or 0 })
end

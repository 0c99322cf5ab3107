
-- expire {user, connection}: the grace period after `detach` ran out.
OPS.expire = function()
  expire(USER, A.connection)
  return result()
end

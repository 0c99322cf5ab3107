
-- refresh {pool}: `queue_update` to the pool's waiting users whose place moved.
OPS.refresh = function()
  refresh_pool(A.pool)
  return result()
end

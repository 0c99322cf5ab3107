
-- detach {user, connection}: the connection went away; a no-op when a newer one took over.
OPS.detach = function()
  detach(USER, A.connection)
  return result()
end

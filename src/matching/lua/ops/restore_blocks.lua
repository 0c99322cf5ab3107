
-- restore_blocks {user, blocked}: puts back the blocks `user` made (oldest first), as the
-- ledger remembers them after a restart or a Redis flush. A user without a hash is away: its
-- blocks expire after the block TTL, as those of a user who left do.
OPS.restore_blocks = function()
  local present = next(user(USER)) ~= nil
  for _, peer in ipairs(A.blocked) do add_block(USER, peer) end
  if not present then
    -- add_block marked the hash; a returning user's attach reads the flag from the set.
    delete_hash(user_key(USER))
    for _, key in ipairs({ blocks_key(USER), block_times_key(USER) }) do
      redis.call('PEXPIRE', key, R.block_ttl_ms)
    end
  end
  return result()
end

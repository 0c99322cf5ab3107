
-- Hashes read at most once per call and written once when it ends: the users' (P:user:<u>),
-- their conduct (P:conduct:<u>), the sessions' (P:session:<id>) and the counters (P:counts).
--
-- Why: one match reads the same two users' hashes five to eight times (the enqueue, the
-- search, the take out of the pools, the session, each event's instance and seq) and writes
-- them as often; each redis.call converts its arguments and reply between Lua and Redis, and
-- those calls were most of a match's Redis CPU. Every read and write of these hashes goes
-- through here: the first read of a hash in a call loads it whole (HGETALL), later reads and
-- writes use the table, and `flush_hashes` writes each changed hash's changed fields (one
-- HSET, one HDEL) when the call ends. The call is atomic, so nobody sees a hash between a
-- change and its flush; nothing in the library reads these hashes but through here (or, to
-- read a few fields of many hashes, straight from Redis right after `flush_hashes`: the
-- media sessions' sweep, a pool's queue updates), and what sets a hash's expiry first writes
-- its changes (`flush_hash`), since an expiry set on a hash the flush creates later would be
-- lost.
--
-- Values are kept as the strings Redis holds: a number written here is stored with tostring,
-- which writes integers (all the library stores in these hashes) as Redis would.

-- The hashes read in this call (key -> { field = value }), and the changes not yet written
-- (key -> { field = value, or false: deleted }), with the keys in the order first changed.
local loaded, unwritten, unwritten_order

local function start_hashes()
  loaded, unwritten, unwritten_order = {}, {}, {}
end

-- The hash at `key` as a table of its fields ({} when there is none). The caller must not
-- change the table: `set_fields` does.
local function hash_of(key)
  local h = loaded[key]
  if h then return h end
  h = {}
  local flat = redis.call('HGETALL', key)
  for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
  -- Changes made before the first read (a step that only writes) are newer than Redis.
  for field, value in pairs(unwritten[key] or {}) do h[field] = value or nil end
  loaded[key] = h
  return h
end

-- Records `value` (false: delete) for `field` of the hash at `key`.
local function change_field(key, field, value)
  entry_of(unwritten, unwritten_order, key)[field] = value
  local h = loaded[key]
  if h then h[field] = value or nil end
end

-- Sets fields of the hash at `key`: `set_fields(key, 'state', 'idle', 'avoid', '')`.
local function set_fields(key, ...)
  for i = 1, select('#', ...), 2 do
    local field, value = select(i, ...)
    change_field(key, field, tostring(value))
  end
end

-- Deletes fields of the hash at `key` (HDEL).
local function delete_fields(key, ...)
  for i = 1, select('#', ...) do change_field(key, (select(i, ...)), false) end
end

-- Adds n to an integer field of the hash at `key` and returns the new value (HINCRBY).
local function increment_field(key, field, n)
  local value = (tonumber(hash_of(key)[field]) or 0) + n
  set_fields(key, field, value)
  return value
end

-- Deletes the hash at `key` now, with any other `keys` (one DEL), and its unwritten changes.
local function delete_hash(key, ...)
  redis.call('DEL', key, ...)
  loaded[key] = {}
  unwritten[key] = nil
end

-- Writes the unwritten changes of the hash at `key` now.
local function flush_hash(key)
  local changes = unwritten[key]
  if not changes then return end
  local set, deleted = {}, {}
  for field, value in pairs(changes) do
    if value then
      set[#set + 1] = field
      set[#set + 1] = value
    else
      deleted[#deleted + 1] = field
    end
  end
  if #set > 0 then redis.call('HSET', key, unpack(set)) end
  if #deleted > 0 then redis.call('HDEL', key, unpack(deleted)) end
  unwritten[key] = nil
end

-- Writes the changes of every hash changed in this call (a key listed twice, changed again
-- after a delete or a flush, is written once).
local function flush_hashes()
  for _, key in ipairs(unwritten_order) do flush_hash(key) end
  unwritten_order = {}
end

-- A user's hash (see keys.lua), and changes to it.
local function user(u) return hash_of(user_key(u)) end
local function set_user(u, ...) set_fields(user_key(u), ...) end

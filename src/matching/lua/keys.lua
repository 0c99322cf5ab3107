
-- Key layout. P, the key root, is "<key prefix>:v2" (e.g. "{mg}:v2"): the version of this
-- layout. Layout 1 (the library before it was split into files, with short field names such
-- as fb, hb, sid, iu, cd) kept its keys right under the prefix; the two layouts share no key
-- but the blocks (below), so during a rolling upgrade across the change the old and the new
-- gateways run as two separate deployments on one Redis: users match only users on
-- instances of their own version, a client that reconnects from an old instance to a new one
-- is not resumed (it starts idle; its old queue place or session times out on the old side),
-- and blocks are seen by both. Keep such mixed periods short.
--
--   P:user:<user>   hash: connection instance away ("1" while the connection is dropped and the
--                   state held) state (idle, queued, pending: paired, not live yet, the queue
--                   fields kept, or session) pool wider_pools relaxed_pools relaxed_prefs
--                   ticket queued_at told_position told_estimate fallback_due session avoid
--                   resume_token last_seq has_blocks ("1" when the user ever blocked anyone)
--                   (wider_pools: the pool of each relaxation step done, "\n"-separated; a step
--                   that drops only a `want` constraint repeats one, and its count is the level)
--                   interests (the tags, "\n"-separated; "" for none) interests_only ("1": never
--                   widens) widened ("1" once the interests wait of this queue place passed)
--                   attributes (the token's, JSON; "" for none) wants (JSON list of the `want`
--                   of every relaxation level, level 0 first, as JSON texts, "" for no
--                   constraint; "" when the enqueue wanted nothing) want (the current level's,
--                   from `wants`). The fields from the enqueue (relaxed_*, interests*,
--                   attributes, wants) stay for a re-queue after a session.
--   P:log:<user>    list of "<seq> <ms> <frame>", newest last, bounded, expires
--   P:pool:<pool>   zset of connected waiting users who are *open* (no interests, or their
--                   interests wait passed), by ticket (FIFO): the open list, which only an
--                   open user searches; a user whose search widened is also listed, with the
--                   same ticket, in the pools in its `wider_pools` field
--   P:held:<pool>   zset of the other waiting users, by ticket, listed like P:pool: those
--                   whose connection dropped (held for a resume) and the connected ones not
--                   open yet. P:pool and P:held together hold everybody waiting, so positions
--                   and emptiness read these two as before; users move to P:pool when they
--                   reattach (if open) or their interests wait passes (if connected)
--   P:tag:<tag>\n<pool> zset of the connected waiting users with interest <tag>, open or not,
--                   by ticket, listed in every pool where P:pool or P:held list them (a tag has
--                   no control characters, so the newline separates it from the pool): what a
--                   user with interests searches, so that a search never visits users who
--                   share none of them unless both are open
--   P:session:<id>  hash: offerer answerer (users) offerer_handle answerer_handle matched_at
--                   phase (proposed, pending or live) offerer_accepted answerer_accepted
--                   live_at
--   P:recent:<user> list of "<session>\t<ms>\t<peer>", newest first, at most RECENT_KEPT:
--                   sessions that went live, for anti-repeat and as the default target of
--                   block and report
--   P:conduct:<user> hash: quick_skips (their times, comma-separated) cooldown_level
--                   cooldown_until quick_end_at enqueue_window_start enqueues
--                   P:recent and P:conduct persist while P:user exists and expire
--                   `conduct_ttl` after it goes (as memory.rs forgets a user's conduct)
--   <prefix>:blk:<user>  set of the users this user blocked (at most max_blocks), and
--   <prefix>:blkt:<user> zset of the same users by when they were blocked, to drop the
--                   oldest; both persist while the user's hash exists and expire block_ttl
--                   after it goes. Outside the versioned root: blocks survive the upgrade.
--   P:media_sessions zset session -> ms matched (LiveKit only: what the room sweep checks)
--   P:pair_deadlines zset session -> ms by which a paired session must be live, else undone
--   P:seen_event:<id> a media event id acted on (de-duplication), expires
--   P:lease:<name>  the instance that runs the periodic job <name>, expires
--   P:ticket        counter; P:counts hash: queued sessions
--   P:smoothed_waits hash: smoothed wait in ms per pool, and over all pools under "*"
--   P:pools         zset pool -> ms last listed in: the pools somebody may wait in (for
--                   `overview`, which like `tick` drops the empty ones)
--   P:matches:<minute> sessions that went live in that minute (unix ms / 60000), expires
--   P:instances     zset instance -> last heartbeat ms
--   P:instance_users:<instance> set of the users attached there
--   P:dead_instances set of dead instances whose users still need cleanup
--   P:last_tick     when any instance last ticked; P:judge_after: no deaths declared before
--                   this (set after a pause that affected everybody)
--   P:held_expiry   zset "<user>\n<connection>" -> ms when the held state expires
--   P:epoch         random id of this dataset: a new one means Redis lost everything
--   P:p2p:<instance> hash: secret (TURN, "" without), credential_ttl_s (of TURN
--                   credentials), stun (the STUN entry's JSON, "" without), turn (the TURN
--                   urls' JSON, "" without): what the matches of that instance list in media
--                   mode p2p; written by that instance (operation p2p_config), expires
-- Interests and wants added only keys (P:tag) and user fields, and widened what
-- P:held holds, so the layout stays v2. During a rolling upgrade, older gateways ignore
-- interests and wants; the users a new gateway put in P:held because they were not open yet
-- are not found by the old ones until their interests wait passes, and a P:tag entry an old
-- gateway leaves behind when it matches such a user is skipped (its ticket is not the user's)
-- and dropped by the next search that meets it.
-- Frames go out with PUBLISH on <channel prefix><instance>, as notices: "F<user>\n<seq>\n<frame>"
-- for a frame (seq 0: none), "K<user>\n<connection>" to close a connection replaced from
-- elsewhere. Relayed messages (signal, chat) go out the same way, without seq and without a log
-- entry. A call publishes once per instance, when it ends (events.lua, `publish_all`): a lone
-- notice as it is, several as one message "M" followed, for each notice in the order the
-- call made them, by its length in bytes (decimal), "\n" and the notice itself, e.g.
-- "M12\nFa\n1\n{\"x\":1}20\nKb\nc000000000000002a" (redis_keys.rs, `Notice::decode_all`,
-- reads both; its tests read this example). A gateway older than this format drops a message
-- of several notices; its clients then see a `seq` gap and resume from the log (4005), so a
-- mixed period costs reconnections, not events.

-- The root of this layout's keys under a key prefix.
local function key_root(prefix) return prefix .. ':v2' end

local function user_key(u) return P .. ':user:' .. u end
local function session_key(s) return P .. ':session:' .. s end
local function pool_key(pool) return P .. ':pool:' .. pool end
local function held_key(pool) return P .. ':held:' .. pool end
local function tag_key(pool, tag) return P .. ':tag:' .. tag .. '\n' .. pool end
local function log_key(u) return P .. ':log:' .. u end
local function recent_key(u) return P .. ':recent:' .. u end
local function conduct_key(u) return P .. ':conduct:' .. u end
local function instance_users_key(i) return P .. ':instance_users:' .. i end
local function blocks_key(u) return S.key_prefix .. ':blk:' .. u end
local function block_times_key(u) return S.key_prefix .. ':blkt:' .. u end

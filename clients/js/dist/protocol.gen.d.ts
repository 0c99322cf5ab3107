/**
 * Client to server (accept phase only): accept the proposed match `match_id`. Direct reply: `ack` (action `accept`). When both have accepted, both get `matched` (in media mode once the room is ready). Accepting twice is harmless. `invalid_state` error when no such proposal is open for you (already decided, expired, or not yours). Unknown fields are ignored by the gateway (forward compatibility).
 */
export interface AcceptMessage {
    type: "accept";
    /**
     * The `match_id` of the open `match_proposed`.
     */
    match_id: string;
    /**
     * Opaque client-chosen correlation id (at most 64 characters); the direct reply to this message echoes it.
     */
    ref?: string;
}
/**
 * Client to server: never be matched with the peer of your current or most recent session (or of `session_id`, one of your recent sessions) again, in either direction. A live session with that peer ends: you get `session_ended` (reason `end`, `requeued: false`), the peer `peer_ended`. Direct reply: `ack` (action `block`). `invalid_state` error when there is no such session. Unknown fields are ignored by the gateway (forward compatibility).
 */
export interface BlockMessage {
    type: "block";
    /**
     * The `session_id` (from `matched`) of one of your recent sessions whose peer is meant. Absent: your current session, or else your most recent one.
     */
    session_id?: string;
    /**
     * Opaque client-chosen correlation id (at most 64 characters); the direct reply to this message echoes it.
     */
    ref?: string;
}
/**
 * Client to server: a text message for the peer of your live session, which receives it as a server `chat` with the gateway's time. Only in a live session: otherwise `invalid_state`. Counts against the per-connection message rate like every other message. Never stored, never logged, not replayed; a peer who is away when it is sent misses it. Direct reply: `ack` (action `chat`). Unknown fields are ignored by the gateway (forward compatibility).
 */
export interface ChatMessage {
    type: "chat";
    /**
     * 1 to 1000 characters (Unicode scalar values, counted by the gateway; JSON Schema's `maxLength` counts the same). No control characters (Unicode category Cc: U+0000 to U+001F, U+007F to U+009F, so no line breaks or tabs either); otherwise `bad_request`.
     */
    text: string;
    /**
     * Opaque client-chosen correlation id (at most 64 characters); the direct reply to this message echoes it.
     */
    ref?: string;
}
/**
 * Client to server (accept phase only): decline the proposed match `match_id`. Direct reply: `ack` (action `decline`). You get `match_cancelled` (reason `declined`) and leave the queue (or, when the gateway runs with `MATCHGATE_DECLINE_TO=tail`, go to the tail of the queue: `requeued: true` and a new `queued`); the other user gets `match_cancelled` (reason `peer_declined`) and is back at its old place in the queue. The two are not proposed to each other again until one of them has been matched with somebody else. `invalid_state` error when no such proposal is open for you. Unknown fields are ignored by the gateway (forward compatibility).
 */
export interface DeclineMessage {
    type: "decline";
    /**
     * The `match_id` of the open `match_proposed`.
     */
    match_id: string;
    /**
     * Opaque client-chosen correlation id (at most 64 characters); the direct reply to this message echoes it.
     */
    ref?: string;
}
/**
 * Client to server: stop. Direct reply: `session_ended` (reason `end`) when in a session, `dequeued` (reason `end`) when queued. `invalid_state` error when idle. Unknown fields are ignored by the gateway (forward compatibility).
 */
export interface EndMessage {
    type: "end";
    /**
     * Opaque client-chosen correlation id (at most 64 characters); the direct reply to this message echoes it.
     */
    ref?: string;
}
/**
 * Client to server: join the queue. Direct reply: `queued` (then `matched` at once if a compatible partner waits; with the accept phase on, `match_proposed`). Compatible means exactly the same `prefs` (all four fields equal, an absent field only equals an absent field; `soft` widens this over time), each one's `want` holding for the other's attributes (from their tokens), a shared interest (until the interests wait widens the search of both), not blocked either way, and not met within the anti-repeat window. Refused with `cooldown` during a skip cooldown, with `rate_limited` beyond the per-user enqueue rate, and with `attribute_required` when the gateway requires an attribute (`MATCHGATE_REQUIRE_ATTRIBUTE`) your token does not carry with the required value. Unknown fields are ignored by the gateway (forward compatibility).
 */
export interface EnqueueMessage {
    type: "enqueue";
    /**
     * Matching preferences; users are only matched with users whose preferences are exactly equal, unless `soft` lets the search widen.
     */
    prefs?: {
        /**
         * Wanted topic (1 to 64 characters). Absent only matches absent.
         */
        topic?: string;
        /**
         * Wanted format (1 to 64 characters). Absent only matches absent.
         */
        format?: string;
        /**
         * Wanted language (1 to 64 characters). Absent only matches absent.
         */
        language?: string;
        /**
         * Wanted region (1 to 64 characters). Absent only matches absent.
         */
        region?: string;
        /**
         * Up to 10 interest tags (e.g. `["jazz", "chess"]`). The gateway trims and lowercases each (`" Jazz "` is `jazz`) and drops repeats; a tag that is empty after trimming or longer than 32 characters is refused with `bad_request`. You are matched first only with users who share at least one tag; after `MATCHGATE_INTERESTS_WAIT_MS` (default 10 s) of waiting the search widens to compatible users without a shared interest (announced by a `queue_update` with `interests_widened: true`), unless `interests_only`. `matched.common_interests` lists the shared tags.
         *
         * Items: An interest tag: trimmed and lowercased by the gateway, then 1 to 32 characters, no control characters.
         */
        interests?: string[];
        /**
         * With `true`, never widen: only users who share an interest. Needs `interests` (otherwise `bad_request`). Default `false`.
         */
        interests_only?: boolean;
        /**
         * Constraints on your peer's attributes, e.g. `{"country": ["de", "at"]}`: you are only matched with users whose token gives each named attribute one of the listed values (a user without the attribute never qualifies). Two-sided: both users' `want` must hold for the other. Attributes come from the users' JWTs (the claims `MATCHGATE_ATTRIBUTE_CLAIMS` names), never from messages. At most 8 attributes (names of 1 to 32 of `a-z 0-9 _`), each with 1 to 16 values of 1 to 64 characters. An attribute the gateway does not list in `MATCHGATE_FILTERABLE_ATTRIBUTES` is refused with `bad_request` naming it. `soft` may name `want.<attribute>` to drop that constraint when you wait long.
         */
        want?: {
            [k: string]: string[] | undefined;
        };
        /**
         * Preference relaxation: fields (or `want.<attribute>` constraints) that may be dropped from the search when you wait long, in this order, one per `MATCHGATE_RELAX_AFTER_MS` of waiting (default 10 s); each step is announced by a `queue_update` with `widened_to`. Each at most once, and each must be set in these `prefs` (a `want.<attribute>` must name a key of `want`; otherwise `bad_request`). Absent or empty: the search never widens.
         */
        soft?: (("topic" | "format" | "language" | "region") | string)[];
    };
    /**
     * Opaque client-chosen correlation id (at most 64 characters); the direct reply to this message echoes it.
     */
    ref?: string;
}
/**
 * Client to server: keep-alive; send any message at least every `heartbeat_interval_ms`. Direct reply: `heartbeat_ack`. Unknown fields are ignored by the gateway (forward compatibility).
 */
export interface HeartbeatMessage {
    type: "heartbeat";
    /**
     * Opaque client-chosen correlation id (at most 64 characters); the direct reply to this message echoes it.
     */
    ref?: string;
}
/**
 * Client to server: a new token for this connection, usually the answer to `token_expiring`. The token must be valid (checked like the handshake's) and name the same user (`sub`) as the connection. Direct reply: `ack` (action `refresh`); from then on the connection lives until the new token's `exp`. Refused with `error` `unauthorized` (the message says why: invalid, expired, or for another user), which costs error budget; the connection then keeps its old token and expiry. Unknown fields are ignored by the gateway (forward compatibility).
 */
export interface RefreshMessage {
    type: "refresh";
    /**
     * The new JWT (the frame must stay within `max_message_bytes`).
     */
    access_token: string;
    /**
     * Opaque client-chosen correlation id (at most 64 characters); the direct reply to this message echoes it.
     */
    ref?: string;
}
/**
 * Client to server: report the peer of your current or most recent session (or of `session_id`, one of your recent sessions) to the operator. The report is stored; a user reported by enough distinct users within the report window is banned automatically. A report changes nothing else: the session goes on (send `block`, `skip` or `end` as well to get away from the peer). Direct reply: `ack` (action `report`). `invalid_state` error when there is no such session. Unknown fields are ignored by the gateway (forward compatibility).
 */
export interface ReportMessage {
    type: "report";
    /**
     * What the peer did.
     */
    reason: "spam" | "nudity" | "harassment" | "underage" | "other";
    /**
     * Free text for the moderators (at most 500 characters).
     */
    details?: string;
    /**
     * The `session_id` (from `matched`) of one of your recent sessions whose peer is meant. Absent: your current session, or else your most recent one.
     */
    session_id?: string;
    /**
     * Opaque client-chosen correlation id (at most 64 characters); the direct reply to this message echoes it.
     */
    ref?: string;
}
/**
 * Client to server: a WebRTC signalling message (SDP offer or answer, ICE candidate, ICE restart, or anything the app wants) for the peer of your live session, which receives it as a server `signal` with the `payload` byte for byte as you sent it. Only in a live session (after `matched`, before `session_ended`): otherwise `invalid_state` (also while idle, queued, proposed or waiting for a media room). The payload may have up to `max_signal_bytes` (announced in `welcome`, default 16384) bytes as serialised in this frame; the frame may exceed `max_message_bytes` by that much (plus 1024 bytes for the rest of the frame), a larger frame closes the connection with 1009. Signals have their own rate budget per connection (default: bursts of 60, 600 per minute; beyond it `rate_limited` with `retry_after_ms`, which costs error budget). Signals are ephemeral: not logged, not replayed after a resume, and lost while the peer is away (after either side resumes, or after `peer_status` `connected`, the offerer restarts ICE). Direct reply: `ack` (action `signal`), which only means the gateway passed it on. Unknown fields are ignored by the gateway (forward compatibility).
 */
export interface SignalMessage {
    type: "signal";
    /**
     * Any JSON object of at most `max_signal_bytes` bytes (as serialised in this frame); relayed unchanged. Anything else (missing, null, an array, a string, too large) gets `bad_request`.
     */
    payload: {
        [k: string]: unknown | undefined;
    };
    /**
     * Opaque client-chosen correlation id (at most 64 characters); the direct reply to this message echoes it.
     */
    ref?: string;
}
/**
 * Client to server: leave the current session and go back in the queue. Direct reply: `session_ended` (reason `skip`), then `queued` (or `matched`). `invalid_state` error when not in a session. Unknown fields are ignored by the gateway (forward compatibility).
 */
export interface SkipMessage {
    type: "skip";
    /**
     * Opaque client-chosen correlation id (at most 64 characters); the direct reply to this message echoes it.
     */
    ref?: string;
}
/**
 * Client to server: ask for the current state. Direct reply: `status`. Unknown fields are ignored by the gateway (forward compatibility).
 */
export interface StatusMessage {
    type: "status";
    /**
     * Opaque client-chosen correlation id (at most 64 characters); the direct reply to this message echoes it.
     */
    ref?: string;
}
/**
 * Server to client (reply, no `seq`, never replayed): the request named by `action` was carried out. The direct reply to `block`, `report`, `accept`, `decline`, `signal`, `chat` and `refresh` (the connection now lives until the new token's `exp`); the events such a request causes travel separately and may arrive before or after it (`session_ended` when a `block` ends a live session; `matched` when an `accept` completes a match; `match_cancelled`, and with `MATCHGATE_DECLINE_TO=tail` a `queued`, after a `decline`). For `signal` and `chat` it means that the gateway passed the message on to the peer's connection, or dropped it because the peer is away (reconnecting) at that moment; it is not a delivery receipt.
 */
export interface AckFrame {
    type: "ack";
    /**
     * The `type` of the client message acknowledged.
     */
    action: "block" | "report" | "accept" | "decline" | "signal" | "chat" | "refresh";
    /**
     * The `ref` of the client message this frame directly answers; absent when that message carried none or when the frame is not a direct reply.
     */
    ref?: string;
}
/**
 * Server to client (no `seq`, never replayed): your peer sent a `chat` message. Messages of one peer arrive in the order it sent them. Never stored by the gateway: one you missed while away is gone.
 */
export interface ChatFrame {
    type: "chat";
    /**
     * The session it belongs to (the `session_id` of `matched`).
     */
    session_id: string;
    /**
     * The text, as the peer sent it: 1 to 1000 characters, no control characters. Untrusted user input: render it as text, never as HTML.
     */
    text: string;
    /**
     * When the gateway passed it on, in milliseconds since the Unix epoch (the gateway clock, see `heartbeat_ack.server_time_ms`).
     */
    sent_at_ms: number;
}
/**
 * Server to client (state-changing, carries `seq`): you left the queue, because you sent `end` or because you did not reconnect within the resume grace period (`timeout`). This includes the moment between a match and `matched`, while the match is proposed (accept phase) or its room is being set up (media mode): the match is undone and the other user goes back to its place in the queue; with the accept phase on it gets `match_cancelled` (reason `peer_left`), otherwise it is not told.
 */
export interface DequeuedFrame {
    type: "dequeued";
    /**
     * Per-user sequence number of this state-changing event: increases by one per event, kept across reconnects while the user's state is held, replayed after a resume.
     */
    seq: number;
    /**
     * `end`: you sent `end`; `timeout`: the resume grace period ran out while you were disconnected.
     */
    reason: "end" | "timeout";
    /**
     * The `ref` of the client message this frame directly answers; absent when that message carried none or when the frame is not a direct reply.
     */
    ref?: string;
}
/**
 * Server to client (no `seq`, never replayed). Usually the reply to a client message that was refused; every error the client caused (all codes but `unavailable`, `internal` and the pushed ones) counts against the per-connection error budget (exhausted: close 4004). Two codes are also pushed, without `ref` and without costing error budget: `media_unavailable` (media mode `livekit`), when no room could be set up for your match and you are back at your place in the queue, still `queued`; and `cooldown`, right after the `session_ended` of the skip that started a cooldown. A `rate_limited` for the per-connection message rate carries no `ref` either: the message was not carried out. A `rate_limited` for the per-connection `signal` rate echoes the signal's `ref`.
 */
export interface ErrorFrame {
    type: "error";
    /**
     * Stable error code. New codes may be added in later versions: treat unknown codes like `internal`. `media_unavailable` is never a reply: it is pushed to both members of a match whose room could not be set up. `cooldown` is the reply to `enqueue` and `skip` during a skip cooldown (and to the `enqueue` that starts one after a quick `end`), and is pushed once when a skip starts one. `unauthorized` is the reply to a refused `refresh` (invalid or expired token, or one for another user); the connection keeps its old token and expiry. `attribute_required` is the reply to an `enqueue` of a user whose token lacks an attribute the gateway requires (`MATCHGATE_REQUIRE_ATTRIBUTE`, e.g. `age_verified=true`; the `message` names it as `name=value`): nothing changed; a `refresh` with a token that carries it, then `enqueue`, gets in.
     */
    code: "bad_request" | "unknown_type" | "invalid_state" | "rate_limited" | "unavailable" | "internal" | "media_unavailable" | "cooldown" | "unauthorized" | "attribute_required";
    /**
     * Human-readable explanation, for logs; not stable. For `unavailable` and `internal` it is fixed text: the backend's details stay in the gateway's log.
     */
    message: string;
    /**
     * The `ref` of the client message this frame directly answers; absent when that message carried none or when the frame is not a direct reply.
     */
    ref?: string;
    /**
     * When to try again, in milliseconds (with `rate_limited`, `unavailable` and `cooldown`; the pushed `cooldown` carries the whole length of the cooldown).
     */
    retry_after_ms?: number;
}
/**
 * Server to client (reply, no `seq`): answer to `heartbeat`.
 */
export interface HeartbeatAckFrame {
    type: "heartbeat_ack";
    /**
     * Gateway clock, in milliseconds since the Unix epoch.
     */
    server_time_ms: number;
    /**
     * The `ref` of the client message this frame directly answers; absent when that message carried none or when the frame is not a direct reply.
     */
    ref?: string;
}
/**
 * Server to client (state-changing, carries `seq`; accept phase only): the proposal `match_id` is off. `requeued` says whether you are in the queue now: back at your old place (ahead of everybody who came later) when the other one declined, timed out or left; at the tail (a new `queued` follows) when you declined or timed out and the gateway runs with `MATCHGATE_DECLINE_TO=tail`; otherwise out of the queue (idle).
 */
export interface MatchCancelledFrame {
    type: "match_cancelled";
    /**
     * Per-user sequence number of this state-changing event: increases by one per event, kept across reconnects while the user's state is held, replayed after a resume.
     */
    seq: number;
    /**
     * Id of the proposed match (opaque). If the match goes through it becomes the `session_id` of the session.
     */
    match_id: string;
    /**
     * From your point of view: you declined, the other one declined, you did not accept before `expires_at_ms`, the other one did not (you had accepted), or the other one left (sent `end`, or did not reconnect within the resume grace period). New reasons may be added in later versions: act on `requeued`.
     */
    reason: "declined" | "peer_declined" | "timeout" | "peer_timeout" | "peer_left";
    /**
     * Whether you are in the queue now. `peer_declined`, `peer_timeout`, `peer_left`: always `true` (back at your old place, and matched again as soon as a partner is there). `declined`, `timeout`: `false` (idle; `enqueue` again to look for someone), or `true` with `MATCHGATE_DECLINE_TO=tail` (a `queued` with your new place follows).
     */
    requeued: boolean;
}
/**
 * Server to client (state-changing, carries `seq`; accept phase only, when the gateway runs with `MATCHGATE_ACCEPT_TIMEOUT_MS` above 0): a partner was found. Send `accept` or `decline` with `match_id` before `expires_at_ms`. When both accept, both get `matched` (in media mode once the room is ready); otherwise both get `match_cancelled`. Until then you are still `queued` (`status` says so, with `position` 0).
 */
export interface MatchProposedFrame {
    type: "match_proposed";
    /**
     * Per-user sequence number of this state-changing event: increases by one per event, kept across reconnects while the user's state is held, replayed after a resume.
     */
    seq: number;
    /**
     * Id of the proposed match (opaque). If the match goes through it becomes the `session_id` of the session.
     */
    match_id: string;
    /**
     * Opaque handle for the proposed peer, fresh for every match; the same value `matched.peer` carries if the match goes through. Never reveals the peer's user id.
     */
    peer: string;
    /**
     * When the proposal lapses, in milliseconds since the Unix epoch (gateway clock; compare with `heartbeat_ack.server_time_ms`). Whoever has not accepted by then gets `match_cancelled` with reason `timeout`.
     */
    expires_at_ms: number;
}
/**
 * Server to client (state-changing, carries `seq`): you are in a session with a peer. Sent to both users at once. It always carries `media`, how to set up the call: in media mode `p2p` (the default, without LiveKit) the ICE servers for a direct WebRTC connection, which the clients signal through `signal`; in media mode `livekit` a LiveKit room, and then `matched` is sent only once the session's room exists.
 */
export interface MatchedFrame {
    type: "matched";
    /**
     * Per-user sequence number of this state-changing event: increases by one per event, kept across reconnects while the user's state is held, replayed after a resume.
     */
    seq: number;
    /**
     * Id of the session (opaque).
     */
    session_id: string;
    /**
     * Opaque handle for your peer, fresh for every session; never reveals the peer's user id. It is also your peer's name on the media side: its participant identity in a LiveKit room (yours is your own handle, the identity in your `media.token`), and the handle in its TURN username.
     */
    peer: string;
    /**
     * Exactly one side is `offerer` (the user who waited longer) and the other `answerer`. With `media.provider` `p2p` the offerer creates the WebRTC offer (and restarts ICE after a resume); with `livekit` the LiveKit SDK sets up the connection and `role` is only informational.
     */
    role: "offerer" | "answerer";
    /**
     * When the session started, in milliseconds since the Unix epoch. In media mode `livekit`: when its room was ready (the moment `matched` was sent). TURN credentials expire `MATCHGATE_TURN_TTL_S` after this moment.
     */
    started_at_ms: number;
    /**
     * The interest tags both of you named in `enqueue.prefs.interests` (normalised: trimmed, lowercased), sorted; the same list in both members' `matched`. Empty when you share none (one of you had no interests, or the search widened).
     */
    common_interests: string[];
    /**
     * How to set up the call, by `provider`: `p2p` (ICE servers for a direct WebRTC connection) or `livekit` (a LiveKit room). New providers may be added in later versions: treat an unknown one as a call you cannot set up (`skip` or `end`).
     */
    media: PeerToPeer | LiveKitRoom;
    /**
     * The `ref` of the client message this frame directly answers; absent when that message carried none or when the frame is not a direct reply.
     */
    ref?: string;
}
/**
 * Media mode `p2p`: build an `RTCPeerConnection` with `{iceServers: ice_servers}`; the `offerer` creates the offer, and offer, answer and ICE candidates go to the peer through `signal`.
 */
export interface PeerToPeer {
    /**
     * Media mode `p2p`: a direct WebRTC connection between the two clients.
     */
    provider: "p2p";
    /**
     * The ICE servers, in the shape of the browser's `RTCIceServer` list (pass it as `iceServers` as it is): one entry with the STUN URLs when the gateway lists STUN servers, one with the TURN URLs and your own time-limited credentials when it lists TURN servers. Empty when neither is configured (enough on a LAN or loopback; calls across the internet need TURN).
     */
    ice_servers: {
        /**
         * `stun:`/`stuns:` or `turn:`/`turns:` URLs (RFC 7064, RFC 7065).
         *
         * @minItems 1
         */
        urls: [string, ...string[]];
        /**
         * TURN only: `<unix expiry in seconds>:<your own handle for this session>` (TURN REST scheme; the handle is what your peer receives as `peer`, never your user id). Expires `MATCHGATE_TURN_TTL_S` (default 3600) seconds after `started_at_ms`.
         */
        username?: string;
        /**
         * TURN only: base64(HMAC-SHA1(TURN secret, username)), as coturn's `use-auth-secret` checks it. A credential: do not log it.
         */
        credential?: string;
    }[];
}
/**
 * Media mode `livekit`: the session's room and your own join token; connect with a LiveKit client SDK (`room.connect(url, token)`).
 */
export interface LiveKitRoom {
    /**
     * Media mode `livekit`: join a LiveKit room.
     */
    provider: "livekit";
    /**
     * The LiveKit server URL to connect to (the gateway's `MATCHGATE_LIVEKIT_URL`, usually `wss://...`).
     */
    url: string;
    /**
     * Name of the room: the gateway's room prefix (default `mg_`) followed by `session_id`. The token admits to this room only.
     */
    room: string;
    /**
     * LiveKit join token (a JWT signed with the gateway's LiveKit API secret). Its identity is your own opaque handle for this session (what your peer receives as `peer`), never your user id. It grants joining this room only, publishing, subscribing and sending data, and expires after `MATCHGATE_LIVEKIT_TOKEN_TTL_S` (default 600 s): join before then. A credential: do not log it.
     */
    token: string;
}
/**
 * Server to client (state-changing, carries `seq`): your peer's connection dropped (`reconnecting`) or came back within the resume grace period (`connected`).
 */
export interface PeerStatusFrame {
    type: "peer_status";
    /**
     * Per-user sequence number of this state-changing event: increases by one per event, kept across reconnects while the user's state is held, replayed after a resume.
     */
    seq: number;
    /**
     * Id of the session (opaque).
     */
    session_id: string;
    /**
     * The peer's connection state.
     */
    state: "reconnecting" | "connected";
}
/**
 * Server to client (informational, no `seq`, never replayed): pushed while you wait, at most once per `queue_update_interval`, and only when your position or estimate changed; and, with `widened_to`, each time your search widens (preference relaxation, see `enqueue.prefs.soft`); and, with `interests_widened`, once when your search widens past your interests (see `enqueue.prefs.interests`).
 */
export interface QueueUpdateFrame {
    type: "queue_update";
    /**
     * How many users are ahead of you in your pool (0 = you are next). Users who are briefly reconnecting keep their place and count.
     */
    position: number;
    /**
     * Estimated wait in milliseconds, from the recent waits of users in your pool (or, with no history there, across all pools); null when the gateway has no recent matches to go on.
     */
    estimated_wait_ms: number | null;
    /**
     * Present when your search just widened (preference relaxation): one more of your `soft` fields was dropped, and these are the preferences searched from now on, besides your original ones and the earlier widened sets. Matching stays exact: you are now also matched with users whose own preferences are exactly this set (a field absent here only matches absent) and with users whose search widened to this same set. `{}` when every field was dropped. `position` and `estimated_wait_ms` still count in the pool of your original preferences.
     */
    widened_to?: {
        /**
         * The topic still searched for.
         */
        topic?: string;
        /**
         * The format still searched for.
         */
        format?: string;
        /**
         * The language still searched for.
         */
        language?: string;
        /**
         * The region still searched for.
         */
        region?: string;
        /**
         * Your interests (normalised), unchanged by relaxation.
         */
        interests?: string[];
        /**
         * Present when you asked for `interests_only`.
         */
        interests_only?: true;
        /**
         * The `want` constraints still applied (a `want.<attribute>` named in `soft` is gone once its step came).
         */
        want?: {
            /**
             * @minItems 1
             */
            [k: string]: [string, ...string[]] | undefined;
        };
    };
    /**
     * Present when your search just widened past your interests: `MATCHGATE_INTERESTS_WAIT_MS` passed without a match with a user who shares one, and from now on you are also matched with compatible users who share none (and whose own search widened, or who named no interests). Never sent with `interests_only`. Comes without `widened_to`.
     */
    interests_widened?: true;
}
/**
 * Server to client (state-changing, carries `seq`): you are in the queue. Reply to `enqueue`, or follows `session_ended` with `requeued: true`.
 */
export interface QueuedFrame {
    type: "queued";
    /**
     * Per-user sequence number of this state-changing event: increases by one per event, kept across reconnects while the user's state is held, replayed after a resume.
     */
    seq: number;
    /**
     * How many users are ahead of you in your pool (0 = you are next). Users who are briefly reconnecting keep their place and count.
     */
    position: number;
    /**
     * Estimated wait in milliseconds, from the recent waits of users in your pool (or, with no history there, across all pools); null when the gateway has no recent matches to go on.
     */
    estimated_wait_ms: number | null;
    /**
     * The `ref` of the client message this frame directly answers; absent when that message carried none or when the frame is not a direct reply.
     */
    ref?: string;
}
/**
 * Server to client (informational, no `seq`): the gateway is about to close the connection and wants the client back after `retry_after_ms` (jittered, so that clients do not all reconnect at once). `shutdown`: the instance is draining (close 1001); reconnect with `resume` and `last_seq`, usually to another instance. `resync`: events may have been lost between instances (close 4005); reconnect with `resume` and `last_seq` to get them from the log, in order. `state_lost`: the gateway's backend lost all state, e.g. Redis restarted empty (close 4006); the queue place or session is gone, so reconnect and start over (a resume token no longer applies).
 */
export interface ReconnectFrame {
    type: "reconnect";
    /**
     * Why the client must reconnect.
     */
    reason: "shutdown" | "resync" | "state_lost";
    /**
     * Jittered delay before reconnecting, so that clients do not all reconnect at once.
     */
    retry_after_ms: number;
}
/**
 * Server to client (state-changing, carries `seq`): your session is over.
 */
export interface SessionEndedFrame {
    type: "session_ended";
    /**
     * Per-user sequence number of this state-changing event: increases by one per event, kept across reconnects while the user's state is held, replayed after a resume.
     */
    seq: number;
    /**
     * Id of the session (opaque).
     */
    session_id: string;
    /**
     * From your point of view: you skipped / ended (`end` also when you blocked your peer), your peer skipped / ended (`peer_ended` also when your peer blocked you), your peer did not come back within the resume grace period (`peer_disconnected`), or you did not (`timeout`). `media_disconnected` (media mode): LiveKit reported that a participant left the room (you or your peer; both get this reason) or that the room closed, or the room vanished. `ended_by_moderator`: a moderator ended the session through the admin API (both get this reason).
     */
    reason: "skip" | "end" | "peer_skipped" | "peer_ended" | "peer_disconnected" | "timeout" | "media_disconnected" | "ended_by_moderator";
    /**
     * Whether you were put back in the queue (a `queued` or `matched` follows). After `skip` the skipper is, unless that skip started a skip cooldown (then `false`, and a pushed `error` `cooldown` follows); the peer too unless the gateway runs with `--requeue-peer-on-skip=false`. After `end` (and after `block`) nobody is. After a timeout the user who timed out is not, the peer (`peer_disconnected`) is re-queued like the peer of a skipper. After `media_disconnected`: when a participant left the room, the one who left is not, the other is re-queued like the peer of a skipper; when the room closed or vanished, nobody is. After `ended_by_moderator` nobody is.
     */
    requeued: boolean;
    /**
     * The `ref` of the client message this frame directly answers; absent when that message carried none or when the frame is not a direct reply.
     */
    ref?: string;
}
/**
 * Server to client (no `seq`, never replayed): your peer sent a `signal`. Signals of one peer arrive in the order it sent them, on whatever instance you are connected to. Process them strictly in order (e.g. one promise chain), since an ICE candidate handled before its description fails. Ephemeral: signals sent while you were away are lost and are not replayed after a resume; the offerer restarts ICE after either side resumes.
 */
export interface SignalFrame {
    type: "signal";
    /**
     * The session it belongs to (the `session_id` of `matched`); ignore a signal of a session that is over.
     */
    session_id: string;
    /**
     * The peer's `payload`, byte for byte as it sent it.
     */
    payload: {
        [k: string]: unknown | undefined;
    };
}
/**
 * Server to client (reply, no `seq`): answer to `status`. `position` and `estimated_wait_ms` are present when queued, `session_id`, `peer` and `role` when in a session. A user whose match is proposed (accept phase) or waiting for its room (media mode) is still `queued`, with `position` 0 and no `estimated_wait_ms`; `status` never repeats `matched.media`.
 */
export interface StatusFrame {
    type: "status";
    /**
     * The user's state.
     */
    state: "idle" | "queued" | "in_session";
    /**
     * How many users are ahead of you in your pool (0 = you are next). Users who are briefly reconnecting keep their place and count.
     */
    position?: number;
    /**
     * Estimated wait in milliseconds, from the recent waits of users in your pool (or, with no history there, across all pools); null when the gateway has no recent matches to go on.
     */
    estimated_wait_ms?: number | null;
    /**
     * Id of the session (opaque).
     */
    session_id?: string;
    /**
     * The `ref` of the client message this frame directly answers; absent when that message carried none or when the frame is not a direct reply.
     */
    ref?: string;
    /**
     * In a session: the peer's opaque handle, as in `matched`.
     */
    peer?: string;
    /**
     * In a session: this user's role, as in `matched`.
     */
    role?: "offerer" | "answerer";
}
/**
 * Server to client (informational, no `seq`, never replayed): the token this connection was opened (or last refreshed) with expires at `expires_at_ms`. Sent `MATCHGATE_TOKEN_EXPIRING_NOTICE_MS` (default 60 s) before then, but never before half of the token's remaining lifetime (as of when the connection got it) has passed, so short-lived tokens are not asked to refresh right after every refresh. Answer with `refresh` and a new token for the same user; without a valid one the connection is closed with 4008 once `expires_at_ms` plus the JWT leeway and `MATCHGATE_TOKEN_EXPIRY_GRACE_MS` (default 10 s) have passed.
 */
export interface TokenExpiringFrame {
    type: "token_expiring";
    /**
     * The token's `exp`, in Unix milliseconds.
     */
    expires_at_ms: number;
}
/**
 * Server to client: first frame on every connection, before any replayed events. Carries no `seq` and is never replayed.
 */
export interface WelcomeFrame {
    type: "welcome";
    /**
     * The authenticated user id (the JWT `sub`).
     */
    user_id: string;
    /**
     * Id of this connection (opaque, for logs and support).
     */
    connection_id: string;
    /**
     * Protocol version spoken by the gateway.
     */
    protocol_version: 1;
    /**
     * Send a message (usually `heartbeat`) at least this often.
     */
    heartbeat_interval_ms: number;
    /**
     * After this much client silence the gateway closes with 4002.
     */
    heartbeat_timeout_ms: number;
    /**
     * Largest client frame accepted; a larger one closes the connection with 1009. `signal` frames have a larger limit of their own (`max_signal_bytes`).
     */
    max_message_bytes: number;
    /**
     * Largest `signal` payload accepted, in bytes as serialised in the frame (default 16384); a larger payload gets `bad_request`, and a `signal` frame may be this plus 1024 bytes long (larger: close 1009).
     */
    max_signal_bytes: number;
    /**
     * Pass as the `resume` query parameter when reconnecting to get the missed events replayed.
     */
    resume_token: string;
    /**
     * Whether this connection resumed with a valid resume token (events after `last_seq` follow).
     */
    resumed: boolean;
    /**
     * The latest `seq` of this user, 0 if none.
     */
    last_seq: number;
    /**
     * The user's state.
     */
    state: "idle" | "queued" | "in_session";
}
/** Every message a client may send. */
export type ClientMessage = AcceptMessage | BlockMessage | ChatMessage | DeclineMessage | EndMessage | EnqueueMessage | HeartbeatMessage | RefreshMessage | ReportMessage | SignalMessage | SkipMessage | StatusMessage;
/** Every frame the gateway may send. */
export type ServerFrame = AckFrame | ChatFrame | DequeuedFrame | ErrorFrame | HeartbeatAckFrame | MatchCancelledFrame | MatchProposedFrame | MatchedFrame | PeerStatusFrame | QueueUpdateFrame | QueuedFrame | ReconnectFrame | SessionEndedFrame | SignalFrame | StatusFrame | TokenExpiringFrame | WelcomeFrame;

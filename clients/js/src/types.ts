// The public types of the SDK besides the wire frames (those are in protocol.gen.ts).
// Type-only: nothing here exists at run time, so dist/index.js stays one self-contained file.

import type {
  AckFrame,
  ChatFrame,
  DequeuedFrame,
  EnqueueMessage,
  MatchCancelledFrame,
  MatchProposedFrame,
  MatchedFrame,
  PeerStatusFrame,
  QueueUpdateFrame,
  QueuedFrame,
  SessionEndedFrame,
  SignalFrame,
  TokenExpiringFrame,
  WelcomeFrame,
} from "./protocol.gen.js";
import type { MatchgateError } from "./index.js";

/**
 * Where the client stands. `connecting` (first connection), then the user's state as the
 * gateway sees it: `idle`, `queued`, `proposed` (a match waits for `accept`), `matched` (in a
 * session); `reconnecting` after a drop (the queue place or session is held meanwhile);
 * `closed` before `connect()`, after `close()` and after a close code that forbids
 * reconnecting (replaced, banned, too many errors, ...).
 */
export type ClientState =
  | "connecting"
  | "idle"
  | "queued"
  | "proposed"
  | "matched"
  | "reconnecting"
  | "closed";

/** The part of the WebSocket API the SDK uses: browsers, Node's global, the `ws` package. */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: any) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: any) => void) | null;
}

/** A WebSocket constructor: the global one, or e.g. `import WebSocket from "ws"`. */
export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface MatchgateOptions {
  /** The gateway's WebSocket endpoint, e.g. `wss://chat.example/v1/ws`. */
  url: string;
  /**
   * Returns an access token (a JWT from your backend). Called before the first connection,
   * before a reconnection when the cached token expires within 10 s (by its `exp`), again
   * after the gateway refused a token (HTTP 401) or a handshake failed for a reason the
   * platform hides (browsers do not expose the HTTP status of a refused WebSocket), and when
   * the gateway announces `token_expiring`: then it must return a new token for the same user
   * (e.g. from your identity provider's refresh flow), which the client sends as `refresh`.
   */
  getToken: () => Promise<string> | string;
  /**
   * WebSocket constructor for runtimes without a global one (Node 20 without
   * `--experimental-websocket`): `import WebSocket from "ws"`. With `ws` the SDK also reads
   * the status, `Retry-After` and body of a refused handshake, which browsers hide.
   */
  WebSocket?: WebSocketConstructor;
  /** How long a request waits for its reply before it rejects with `timeout`. Default 10000. */
  requestTimeoutMs?: number;
  /** How long one connection attempt may take until `welcome`. Default 10000. */
  connectTimeoutMs?: number;
  /** Jittered exponential backoff between attempts: first delay and cap. 500 and 30000 ms. */
  backoff?: { initialMs?: number; maxMs?: number };
  /**
   * Drive heartbeats and reconnect delays from a dedicated Worker where one can be made
   * (browsers), because browsers throttle timers of hidden tabs to about once a minute.
   * Default true; falls back to ordinary timers where no Worker is available (Node).
   */
  workerTimers?: boolean;
}

/** Details of a `state` event. */
export interface StateChange {
  previous: ClientState;
}

/** Why a connection (or an attempt) ended, and what the client does next. */
export interface DisconnectInfo {
  /** WebSocket close code; 1006 when the socket died without one (or never opened). */
  code: number;
  reason: string;
  /** Name of the close code's policy (`dropped`, `going_away`, `replaced`, ...) or refusal. */
  policy: string;
  /** HTTP status of a refused handshake, when the platform shows it (the `ws` package). */
  status?: number;
  /** Whether the client will try again, and in how many ms. */
  willReconnect: boolean;
  retryInMs?: number;
  /** Whether the next attempt resumes (`resume` + `last_seq`) or starts over. */
  resume: boolean;
}

/** What the client knows about the current session. */
export interface SessionInfo {
  session_id: string;
  peer: string;
  role: "offerer" | "answerer";
  /** Absent when the session was learnt from `status` (a reconnect that could not resume). */
  started_at_ms?: number;
  /** The interests both of you named, sorted; absent when learnt from `status`. */
  common_interests?: MatchedFrame["common_interests"];
  media?: MatchedFrame["media"];
}

/** What `mg.enqueue(prefs)` takes: topic, format, language, region, interests, want, soft. */
export type EnqueuePrefs = NonNullable<EnqueueMessage["prefs"]>;

/** Handlers by event name; `mg.on(name, handler)` returns a function that unsubscribes. */
export interface MatchgateEvents {
  state: (state: ClientState, change: StateChange) => void;
  welcome: (frame: WelcomeFrame) => void;
  disconnected: (info: DisconnectInfo) => void;
  queued: (frame: QueuedFrame) => void;
  queue_update: (frame: QueueUpdateFrame) => void;
  dequeued: (frame: DequeuedFrame) => void;
  match_proposed: (frame: MatchProposedFrame) => void;
  match_cancelled: (frame: MatchCancelledFrame) => void;
  matched: (frame: MatchedFrame) => void;
  session_ended: (frame: SessionEndedFrame) => void;
  peer_status: (frame: PeerStatusFrame) => void;
  signal: (frame: SignalFrame) => void;
  chat: (frame: ChatFrame) => void;
  /** The connection's token expires soon; the client is already sending a `refresh`. */
  token_expiring: (frame: TokenExpiringFrame) => void;
  /** The gateway accepted a new token (after `token_expiring`, or `refreshToken()`). */
  token_refreshed: (ack: AckFrame) => void;
  /**
   * Errors no promise reports: pushed `error` frames, refused handshakes, `getToken` failures,
   * a refused automatic `refresh` (`unauthorized`).
   */
  error: (error: MatchgateError) => void;
}

/**
 * The payloads the call helper sends through `signal`. Each has a string field `mg`; give your
 * own payloads no `mg` field and they travel beside these untouched.
 */
export type CallSignal =
  | { mg: "sdp"; description: { type: "offer" | "answer"; sdp: string } }
  | { mg: "candidate"; candidate: RTCIceCandidateInit | null }
  | { mg: "restart" };

export interface CallOptions {
  /** Tracks to send; without one of a kind, that kind is only received. */
  localStream?: MediaStream;
  /** `"relay"` forces TURN. Default `"all"`. */
  iceTransportPolicy?: RTCIceTransportPolicy;
  /** For runtimes whose `RTCPeerConnection` is not global. */
  RTCPeerConnection?: typeof RTCPeerConnection;
}

export type CallCloseReason = "session_ended" | "closed" | "client_closed";

export interface CallEvents {
  remote_stream: (stream: MediaStream) => void;
  /** The peer connection's `connectionState`. */
  state: (state: RTCPeerConnectionState) => void;
  closed: (reason: CallCloseReason) => void;
  error: (error: Error) => void;
}

/**
 * matchgate-client: the browser and Node client of a matchgate gateway (protocol v1).
 *
 * One `Matchgate` holds one WebSocket to the gateway and keeps it alive: it authenticates with
 * the token your `getToken` returns, sends heartbeats (from a Worker in browsers, whose timers
 * hidden tabs do not throttle), resumes after a drop with `resume_token` and `last_seq` so that
 * missed events are replayed exactly once, follows every close code as protocol/README.md
 * documents it, and answers `token_expiring` with a `refresh` carrying a new token from
 * `getToken`, so that a live connection outlives its first token. Requests are promises matched to their replies by `ref`; what the gateway
 * pushes arrives as typed events. `mg.call()` turns a `p2p` match into a WebRTC call.
 *
 * All run-time code lives in this one file so that the build is a single ES module without
 * imports (the gateway embeds it for its demo page); the other sources hold types only.
 */

import type {
  AckFrame,
  ClientMessage,
  DequeuedFrame,
  EnqueueMessage,
  ErrorFrame,
  HeartbeatAckFrame,
  MatchProposedFrame,
  PeerToPeer,
  QueuedFrame,
  ReportMessage,
  ServerFrame,
  SessionEndedFrame,
  SignalFrame,
  SignalMessage,
  StatusFrame,
  TokenExpiringFrame,
  WelcomeFrame,
} from "./protocol.gen.js";
import type {
  CallCloseReason,
  CallEvents,
  CallOptions,
  CallSignal,
  ClientState,
  DisconnectInfo,
  MatchgateEvents,
  MatchgateOptions,
  SessionInfo,
  StateChange,
  WebSocketConstructor,
  WebSocketLike,
} from "./types.js";

export type * from "./protocol.gen.js";
export type * from "./types.js";

// ---------------------------------------------------------------------------------------------
// Errors

/**
 * Every rejection and every `error` event. For a refusal by the gateway `code` is the `error`
 * frame's code and `frame` the frame itself; the SDK's own codes are `not_connected` (a request
 * while not connected: requests are never queued), `disconnected` (the connection dropped
 * before the reply; the request may or may not have been carried out, the events tell),
 * `timeout`, `closed`, `bad_request` (refused before sending, e.g. a frame over
 * `max_message_bytes`, which would close the connection), `invalid_state` (e.g. `accept()`
 * with no proposal), `token_failed`, and for refused handshakes `unauthorized`, `forbidden`,
 * `banned`, `rate_limited`, `unavailable`, `handshake_failed` (status hidden by the platform).
 */
export class MatchgateError extends Error {
  override readonly name = "MatchgateError";
  readonly code: string;
  readonly retry_after_ms?: number;
  readonly ref?: string;
  /** HTTP status of a refused handshake, when known. */
  readonly status?: number;
  /** The gateway's `error` frame, when this error is one. */
  readonly frame?: ErrorFrame;

  constructor(
    code: string,
    message: string,
    extra: { retry_after_ms?: number; ref?: string; status?: number; frame?: ErrorFrame; cause?: unknown } = {},
  ) {
    super(message, extra.cause === undefined ? undefined : { cause: extra.cause });
    this.code = code;
    if (extra.retry_after_ms !== undefined) this.retry_after_ms = extra.retry_after_ms;
    if (extra.ref !== undefined) this.ref = extra.ref;
    if (extra.status !== undefined) this.status = extra.status;
    if (extra.frame !== undefined) this.frame = extra.frame;
  }

  static fromFrame(frame: ErrorFrame): MatchgateError {
    return new MatchgateError(frame.code, frame.message, {
      ...(frame.retry_after_ms !== undefined && { retry_after_ms: frame.retry_after_ms }),
      ...(frame.ref !== undefined && { ref: frame.ref }),
      frame,
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Close codes

/**
 * What the client does after a close code:
 * - `stop`: stay closed (the user or the app has to act);
 * - `resume`: reconnect with `resume` and `last_seq`, so the gateway replays what was missed;
 * - `restart`: reconnect without them: the gateway's state is gone, start over.
 * The delay is the jittered backoff, or for `server` the `retry_after_ms` of the `reconnect`
 * frame the gateway sent before closing (it is already jittered by the gateway).
 */
export interface ClosePolicy {
  readonly name: string;
  readonly action: "stop" | "resume" | "restart";
  readonly delay: "backoff" | "server";
}

/** The close codes of protocol/README.md ("Close codes"), one entry each. */
export const CLOSE_POLICIES: Readonly<Record<number, ClosePolicy>> = Object.freeze({
  1000: { name: "normal", action: "stop", delay: "backoff" },
  1001: { name: "going_away", action: "resume", delay: "server" },
  1009: { name: "message_too_big", action: "stop", delay: "backoff" },
  1011: { name: "internal_error", action: "resume", delay: "backoff" },
  // Preceded by an `error` `unavailable` whose `retry_after_ms` is a floor for the backoff.
  1013: { name: "try_again_later", action: "resume", delay: "backoff" },
  4001: { name: "replaced", action: "stop", delay: "backoff" },
  4002: { name: "heartbeat_timeout", action: "resume", delay: "backoff" },
  4003: { name: "slow_consumer", action: "resume", delay: "backoff" },
  4004: { name: "too_many_errors", action: "stop", delay: "backoff" },
  4005: { name: "resync", action: "resume", delay: "server" },
  4006: { name: "state_lost", action: "restart", delay: "server" },
  4007: { name: "banned", action: "stop", delay: "backoff" },
  // The token expired without a refresh: the reconnect asks `getToken` for a new one.
  4008: { name: "token_expired", action: "resume", delay: "backoff" },
});

/** A socket that died without a close frame (1006), or a code this version does not know. */
const DROPPED: ClosePolicy = { name: "dropped", action: "resume", delay: "backoff" };

export function closePolicy(code: number): ClosePolicy {
  return CLOSE_POLICIES[code] ?? DROPPED;
}

/** Jittered exponential backoff: the first retry within `initial`, then half to all of
 * `initial * 2^attempt`, capped at `max`. */
export function backoffDelay(attempt: number, initialMs: number, maxMs: number): number {
  if (attempt <= 0) return Math.random() * initialMs;
  const cap = Math.min(maxMs, initialMs * 2 ** attempt);
  return cap / 2 + (Math.random() * cap) / 2;
}

// ---------------------------------------------------------------------------------------------
// Timers that survive background tabs

interface Timers {
  after(ms: number, fn: () => void): () => void;
  every(ms: number, fn: () => void): () => void;
  dispose(): void;
}

const nativeTimers: Timers = {
  after(ms, fn) {
    const id = setTimeout(fn, ms);
    return () => clearTimeout(id);
  },
  every(ms, fn) {
    const id = setInterval(fn, ms);
    return () => clearInterval(id);
  },
  dispose() {},
};

// The worker only counts time; the callbacks run on the main thread when its messages arrive.
// Messages from a worker are not throttled like the timers of a hidden tab.
const TIMER_WORKER_SOURCE = `const timers = new Map();
onmessage = (event) => {
  const [op, id, ms] = event.data;
  if (op === "clear") { clearTimeout(timers.get(id)); clearInterval(timers.get(id)); timers.delete(id); return; }
  timers.set(id, op === "every"
    ? setInterval(() => postMessage(id), ms)
    : setTimeout(() => { timers.delete(id); postMessage(id); }, ms));
};`;

interface WorkerTimer {
  fn: () => void;
  ms: number;
  repeat: boolean;
  /** Set once the worker failed and the timer was moved to the main thread. */
  cancelNative?: () => void;
}

/** Timers counted by a Worker made from a Blob URL; if the worker fails (e.g. a Content
 * Security Policy without `worker-src blob:`), its timers move to the main thread. */
class WorkerTimers implements Timers {
  private readonly worker: Worker;
  private readonly url: string;
  private readonly timers = new Map<number, WorkerTimer>();
  private nextId = 1;
  private failed = false;

  constructor() {
    this.url = URL.createObjectURL(new Blob([TIMER_WORKER_SOURCE], { type: "text/javascript" }));
    try {
      this.worker = new Worker(this.url);
    } catch (e) {
      URL.revokeObjectURL(this.url);
      throw e;
    }
    this.worker.onmessage = (event: MessageEvent<number>) => {
      const timer = this.timers.get(event.data);
      if (timer === undefined) return;
      if (!timer.repeat) this.timers.delete(event.data);
      timer.fn();
    };
    this.worker.onerror = () => this.fallBack();
  }

  after(ms: number, fn: () => void): () => void {
    return this.start({ fn, ms, repeat: false });
  }

  every(ms: number, fn: () => void): () => void {
    return this.start({ fn, ms, repeat: true });
  }

  dispose(): void {
    for (const timer of this.timers.values()) timer.cancelNative?.();
    this.timers.clear();
    this.worker.terminate();
    URL.revokeObjectURL(this.url);
  }

  private start(timer: WorkerTimer): () => void {
    const id = this.nextId++;
    this.timers.set(id, timer);
    if (this.failed) this.runNatively(id, timer);
    else this.worker.postMessage([timer.repeat ? "every" : "after", id, timer.ms]);
    return () => {
      if (!this.timers.delete(id)) return;
      if (timer.cancelNative) timer.cancelNative();
      else this.worker.postMessage(["clear", id, 0]);
    };
  }

  private fallBack(): void {
    if (this.failed) return;
    this.failed = true;
    for (const [id, timer] of this.timers) this.runNatively(id, timer);
  }

  private runNatively(id: number, timer: WorkerTimer): void {
    const fire = () => {
      if (!timer.repeat) this.timers.delete(id);
      timer.fn();
    };
    timer.cancelNative = timer.repeat ? nativeTimers.every(timer.ms, fire) : nativeTimers.after(timer.ms, fire);
  }
}

function createTimers(useWorker: boolean): Timers {
  if (
    useWorker &&
    typeof Worker === "function" &&
    typeof Blob === "function" &&
    typeof URL?.createObjectURL === "function"
  ) {
    try {
      return new WorkerTimers();
    } catch {
      // No worker allowed here: ordinary timers.
    }
  }
  return nativeTimers;
}

// ---------------------------------------------------------------------------------------------
// Tokens

/** A token is renewed when it expires within this long (the gateway's leeway may be 0). */
const TOKEN_RENEW_MARGIN_MS = 10_000;

/** The `exp` of a JWT in ms, read without verifying (only the gateway can); null if none. */
function tokenExpiryMs(token: string): number | null {
  const payload = token.split(".")[1];
  if (payload === undefined) return null;
  try {
    const base64 = payload.replace(/-/g, "+").replace(/_/g, "/");
    const claims: unknown = JSON.parse(atob(base64 + "=".repeat((4 - (base64.length % 4)) % 4)));
    const exp = (claims as { exp?: unknown }).exp;
    return typeof exp === "number" ? exp * 1000 : null;
  } catch {
    return null;
  }
}

class TokenCache {
  private token: string | null = null;

  constructor(private readonly getToken: () => Promise<string> | string) {}

  /** The cached token while it is valid for a while, else a new one from `getToken`. */
  async get(): Promise<{ token: string; fresh: boolean }> {
    if (this.token !== null) {
      const expiry = tokenExpiryMs(this.token);
      if (expiry === null || expiry - Date.now() > TOKEN_RENEW_MARGIN_MS) return { token: this.token, fresh: false };
    }
    this.token = null;
    let token: unknown;
    try {
      token = await this.getToken();
    } catch (e) {
      throw new MatchgateError("token_failed", `getToken failed: ${String(e)}`, { cause: e });
    }
    if (typeof token !== "string" || token === "") {
      throw new MatchgateError("token_failed", "getToken must return a non-empty string");
    }
    this.token = token;
    return { token, fresh: true };
  }

  forget(): void {
    this.token = null;
  }
}

// ---------------------------------------------------------------------------------------------
// Events

type Handler = (...args: any[]) => void;

/** Typed events: `on` returns a function that unsubscribes. A handler that throws does not
 * stop the others or the client; its error is rethrown on its own. */
class Emitter<Events extends { [E in keyof Events]: Handler }> {
  private readonly handlers = new Map<keyof Events, Set<Handler>>();

  on<E extends keyof Events>(event: E, handler: Events[E]): () => void {
    let set = this.handlers.get(event);
    if (set === undefined) this.handlers.set(event, (set = new Set()));
    set.add(handler);
    return () => this.off(event, handler);
  }

  off<E extends keyof Events>(event: E, handler: Events[E]): void {
    this.handlers.get(event)?.delete(handler);
  }

  protected emit<E extends keyof Events>(event: E, ...args: Parameters<Events[E]>): void {
    for (const handler of [...(this.handlers.get(event) ?? [])]) {
      try {
        handler(...args);
      } catch (e) {
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The client

const OPEN = 1;
const ABNORMAL_CLOSURE = 1006;
/** Signals of the current session kept for a `Call` created after they arrived. */
const CALL_SIGNAL_BUFFER = 256;

/** What a refused handshake told, when the platform lets us see it (the `ws` package). */
interface Refusal {
  status: number;
  retryAfterMs?: number;
  error?: string;
  reason?: string;
}

/** One WebSocket and what is known about it. */
interface Attempt {
  ws: WebSocketLike;
  freshToken: boolean;
  opened: boolean;
  welcome: WelcomeFrame | null;
  refusal: Refusal | null;
  cancelTimers: Array<() => void>;
}

interface Pending {
  resolve: (frame: any) => void;
  reject: (error: MatchgateError) => void;
  cancelTimeout: () => void;
}

/** After a welcome: replayed events are being applied, or the state is being asked for. */
interface CatchUp {
  /** The gateway's latest seq: the replay is over once it has been applied. */
  untilSeq: number;
  serverState: WelcomeFrame["state"];
  /** Not resumed but in a session: waiting for the `status` that names the session. */
  awaitingStatus: boolean;
}

type ProtocolState = "idle" | "queued" | "proposed" | "matched";

export class Matchgate extends Emitter<MatchgateEvents> {
  private readonly url: string;
  private readonly WebSocketImpl: WebSocketConstructor;
  private readonly tokens: TokenCache;
  private readonly requestTimeoutMs: number;
  private readonly connectTimeoutMs: number;
  private readonly backoffInitialMs: number;
  private readonly backoffMaxMs: number;
  private readonly useWorkerTimers: boolean;

  private timers: Timers | null = null;
  private current: Attempt | null = null;
  private cancelRetry: (() => void) | null = null;
  private removeOnlineListener: (() => void) | null = null;
  private failures = 0;
  private everConnected = false;
  private connectWaiters: Array<{ resolve: (w: WelcomeFrame) => void; reject: (e: MatchgateError) => void }> = [];

  private _state: ClientState = "closed";
  private protocolState: ProtocolState = "idle";
  private catchUp: CatchUp | null = null;
  private _welcome: WelcomeFrame | null = null;
  private resumeToken: string | null = null;
  private lastSeq = 0;
  private _session: SessionInfo | null = null;
  private _proposal: MatchProposedFrame | null = null;
  /** `retry_after_ms` of the `reconnect` or `error` frame that came before a close. */
  private serverRetryAfterMs: number | null = null;
  private lastReceivedAt = 0;

  private readonly pending = new Map<string, Pending>();
  private readonly refPrefix = Math.random().toString(36).slice(2, 8);
  private refCounter = 0;
  /** Call-helper signals of the current session that arrived before `call()`. */
  private callSignals: SignalFrame[] = [];
  private activeCall: Call | null = null;

  constructor(options: MatchgateOptions) {
    super();
    if (typeof options?.url !== "string" || !/^wss?:\/\//.test(options.url)) {
      throw new TypeError("Matchgate: `url` must be a ws:// or wss:// URL");
    }
    if (typeof options.getToken !== "function") throw new TypeError("Matchgate: `getToken` must be a function");
    const impl = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (typeof impl !== "function") {
      throw new TypeError(
        "Matchgate: no WebSocket here; pass one, e.g. `import WebSocket from \"ws\"` and `new Matchgate({ ..., WebSocket })` (or run Node with --experimental-websocket)",
      );
    }
    this.url = options.url;
    this.WebSocketImpl = impl;
    this.tokens = new TokenCache(options.getToken);
    this.requestTimeoutMs = options.requestTimeoutMs ?? 10_000;
    this.connectTimeoutMs = options.connectTimeoutMs ?? 10_000;
    this.backoffInitialMs = options.backoff?.initialMs ?? 500;
    this.backoffMaxMs = options.backoff?.maxMs ?? 30_000;
    this.useWorkerTimers = options.workerTimers ?? true;
  }

  // --- what the app reads -------------------------------------------------------------------

  get state(): ClientState {
    return this._state;
  }

  /** The `welcome` of the current (or last) connection. */
  get welcome(): WelcomeFrame | null {
    return this._welcome;
  }

  /** The current session, while `state` is `matched` (kept while reconnecting). */
  get session(): SessionInfo | null {
    return this._session;
  }

  /** The open proposal, while `state` is `proposed`. */
  get proposal(): MatchProposedFrame | null {
    return this._proposal;
  }

  // --- connection ---------------------------------------------------------------------------

  /**
   * Connects (if not connected yet) and resolves with the `welcome` once the client knows its
   * state. Failed attempts are retried with backoff meanwhile (see the `disconnected` and
   * `error` events); it rejects when the client ends up `closed` first.
   */
  connect(): Promise<WelcomeFrame> {
    if (this.isReady()) return Promise.resolve(this._welcome!);
    const ready = new Promise<WelcomeFrame>((resolve, reject) => this.connectWaiters.push({ resolve, reject }));
    if (this._state === "closed") {
      this.timers = createTimers(this.useWorkerTimers);
      this.failures = 0;
      this.everConnected = false;
      this.watchOnline();
      this.setState("connecting");
      void this.open();
    }
    return ready;
  }

  /**
   * Closes the connection and stays closed. The gateway holds the user's queue place or
   * session for its resume grace period, as after any disconnect: call `end()` first to leave.
   */
  close(): void {
    if (this._state === "closed") return;
    const attempt = this.current;
    this.current = null;
    if (attempt !== null) {
      for (const cancel of attempt.cancelTimers) cancel();
      try {
        attempt.ws.close(1000, "client closed");
      } catch {
        // Already closing.
      }
    }
    this.shutDown(new MatchgateError("closed", "the client was closed"));
  }

  // --- requests -----------------------------------------------------------------------------

  /** Joins the queue. Resolves with `queued`. */
  enqueue(prefs?: EnqueueMessage["prefs"]): Promise<QueuedFrame> {
    return this.request(prefs === undefined ? { type: "enqueue" } : { type: "enqueue", prefs });
  }

  /** Ends the session and looks for someone else. Resolves with `session_ended` (`skip`). */
  skip(): Promise<SessionEndedFrame> {
    return this.request({ type: "skip" });
  }

  /** Leaves the queue or the session. Resolves with `dequeued` or `session_ended`. */
  end(): Promise<DequeuedFrame | SessionEndedFrame> {
    return this.request({ type: "end" });
  }

  /** Blocks the peer of the current (else the most recent) session, or of `sessionId`. */
  block(sessionId?: string): Promise<AckFrame> {
    return this.request(sessionId === undefined ? { type: "block" } : { type: "block", session_id: sessionId });
  }

  /** Reports the peer of the current (else the most recent) session, or of `sessionId`. */
  report(reason: ReportMessage["reason"], details?: string, sessionId?: string): Promise<AckFrame> {
    return this.request({
      type: "report",
      reason,
      ...(details !== undefined && { details }),
      ...(sessionId !== undefined && { session_id: sessionId }),
    });
  }

  /** Accepts the open proposal (or `matchId`). Resolves with `ack`; `matched` follows. */
  accept(matchId?: string): Promise<AckFrame> {
    return this.answerProposal("accept", matchId);
  }

  /** Declines the open proposal (or `matchId`). Resolves with `ack`. */
  decline(matchId?: string): Promise<AckFrame> {
    return this.answerProposal("decline", matchId);
  }

  /** Sends `payload` (a JSON object) to the peer of the current session. Resolves with `ack`. */
  signal(payload: Record<string, unknown>): Promise<AckFrame> {
    if (payload === null || typeof payload !== "object" || Array.isArray(payload)) {
      return Promise.reject(new MatchgateError("bad_request", "a signal payload must be a JSON object"));
    }
    return this.request({ type: "signal", payload });
  }

  /** Sends a chat message (1 to 1000 characters) to the peer. Resolves with `ack`. */
  chat(text: string): Promise<AckFrame> {
    return this.request({ type: "chat", text });
  }

  /** Asks where the user stands. Resolves with `status`. */
  status(): Promise<StatusFrame> {
    return this.request({ type: "status" });
  }

  /**
   * Gives the live connection a new token from `getToken` (never the cached one), for the same
   * user. Resolves with `ack` (action `refresh`); rejects with `unauthorized` when the gateway
   * refuses it (the connection then keeps its old token), or `token_failed`. The client does
   * this by itself on `token_expiring`.
   */
  async refreshToken(): Promise<AckFrame> {
    if (this.connected() === null) return this.notConnected("refresh");
    this.tokens.forget();
    const { token } = await this.tokens.get();
    const ack = await this.request<AckFrame>({ type: "refresh", access_token: token });
    this.emit("token_refreshed", ack);
    return ack;
  }

  /** `token_expiring`: refresh now; what fails is reported as an `error` event. */
  private tokenExpiring(frame: TokenExpiringFrame): void {
    this.emit("token_expiring", frame);
    this.refreshToken().catch((e: unknown) => {
      this.emit(
        "error",
        e instanceof MatchgateError ? e : new MatchgateError("token_failed", String(e), { cause: e }),
      );
    });
  }

  /**
   * Starts the WebRTC call of the current `p2p` session (see `Call`). Throws when not in a
   * session or when the session's media is not `p2p` (LiveKit: use a LiveKit SDK).
   */
  call(options: CallOptions = {}): Call {
    const session = this._session;
    if (this._state !== "matched" || session === null) {
      throw new MatchgateError("invalid_state", "call() needs a session: wait for `matched`");
    }
    const media = session.media;
    if (media !== undefined && media.provider !== "p2p") {
      throw new MatchgateError("invalid_state", `this session's media is ${media.provider}, not p2p`);
    }
    if (this.activeCall !== null) {
      throw new MatchgateError("invalid_state", "this session already has a call: close it first");
    }
    const iceServers = (media as PeerToPeer | undefined)?.ice_servers ?? [];
    const buffered = this.callSignals;
    this.callSignals = [];
    const call = new Call(this, session, iceServers as RTCIceServer[], options, buffered, () => {
      if (this.activeCall === call) this.activeCall = null;
    });
    this.activeCall = call;
    return call;
  }

  private answerProposal(type: "accept" | "decline", matchId?: string): Promise<AckFrame> {
    const id = matchId ?? this._proposal?.match_id;
    if (this.connected() === null) return this.notConnected(type);
    if (id === undefined) {
      return Promise.reject(new MatchgateError("invalid_state", `no open proposal to ${type}`));
    }
    return this.request({ type, match_id: id });
  }

  private request<F extends ServerFrame>(message: ClientMessage): Promise<F> {
    const attempt = this.connected();
    if (attempt === null) return this.notConnected(message.type);
    const ref = `${this.refPrefix}${++this.refCounter}`;
    const text = JSON.stringify({ ...message, ref });
    const tooBig = this.oversize(message, text, attempt.welcome);
    if (tooBig !== null) return Promise.reject(new MatchgateError("bad_request", tooBig));
    return new Promise<F>((resolve, reject) => {
      const cancelTimeout = this.timers!.after(this.requestTimeoutMs, () => {
        this.pending.delete(ref);
        reject(new MatchgateError("timeout", `no reply to ${message.type} within ${this.requestTimeoutMs} ms`, { ref }));
      });
      this.pending.set(ref, { resolve, reject, cancelTimeout });
      try {
        attempt.ws.send(text);
      } catch (e) {
        this.settle(ref)?.reject(new MatchgateError("disconnected", `${message.type} could not be sent`, { ref, cause: e }));
      }
    });
  }

  /** The connection requests go over, once it has been welcomed. */
  private connected(): (Attempt & { welcome: WelcomeFrame }) | null {
    const attempt = this.current;
    if (attempt === null || attempt.welcome === null || attempt.ws.readyState !== OPEN) return null;
    return attempt as Attempt & { welcome: WelcomeFrame };
  }

  private notConnected(type: string): Promise<never> {
    return Promise.reject(new MatchgateError("not_connected", `not connected (state ${this._state}): ${type} was not sent`));
  }

  /** A frame over the gateway's limit would close the connection (1009): refuse it here. */
  private oversize(message: { type: string }, text: string, welcome: WelcomeFrame): string | null {
    const encoder = new TextEncoder();
    if (message.type === "signal") {
      const limit = welcome.max_signal_bytes;
      const size = encoder.encode(JSON.stringify((message as SignalMessage).payload)).length;
      return size > limit ? `signal payload of ${size} bytes exceeds max_signal_bytes (${limit})` : null;
    }
    const size = encoder.encode(text).length;
    return size > welcome.max_message_bytes
      ? `${message.type} frame of ${size} bytes exceeds max_message_bytes (${welcome.max_message_bytes})`
      : null;
  }

  private settle(ref: string): Pending | undefined {
    const pending = this.pending.get(ref);
    if (pending === undefined) return undefined;
    this.pending.delete(ref);
    pending.cancelTimeout();
    return pending;
  }

  private rejectAllPending(error: (ref: string) => MatchgateError): void {
    for (const ref of [...this.pending.keys()]) this.settle(ref)?.reject(error(ref));
  }

  // --- the socket ---------------------------------------------------------------------------

  private isReady(): boolean {
    return this.current?.welcome != null && this.catchUp === null && this._state !== "closed";
  }

  private async open(): Promise<void> {
    const timers = this.timers;
    let token: { token: string; fresh: boolean };
    try {
      token = await this.tokens.get();
    } catch (e) {
      if (this.timers !== timers || this._state === "closed") return;
      const error = e instanceof MatchgateError ? e : new MatchgateError("token_failed", String(e), { cause: e });
      this.emit("error", error);
      this.retry(
        { code: ABNORMAL_CLOSURE, reason: error.message, policy: "token_failed", resume: this.resumeToken !== null },
        this.nextBackoff(),
      );
      return;
    }
    if (this.timers !== timers || this._state === "closed") return;

    const url = new URL(this.url);
    url.searchParams.set("access_token", token.token);
    if (this.resumeToken !== null) {
      url.searchParams.set("resume", this.resumeToken);
      url.searchParams.set("last_seq", String(this.lastSeq));
    }
    let ws: WebSocketLike;
    try {
      ws = new this.WebSocketImpl(url.toString());
    } catch (e) {
      this.shutDown(new MatchgateError("closed", `cannot open a WebSocket to ${this.url}: ${String(e)}`, { cause: e }));
      return;
    }
    const attempt: Attempt = {
      ws,
      freshToken: token.fresh,
      opened: false,
      welcome: null,
      refusal: null,
      cancelTimers: [],
    };
    this.current = attempt;
    ws.onopen = () => {
      attempt.opened = true;
    };
    ws.onmessage = (event) => {
      if (this.current === attempt) this.receive(attempt, event.data);
    };
    ws.onclose = (event) => {
      if (this.current === attempt) this.ended(attempt, event.code, event.reason);
    };
    ws.onerror = () => {
      // Once open, the close event that follows says what happened. Before, some
      // implementations (Node's own WebSocket) report a failed handshake with this alone.
      if (this.current === attempt && !attempt.opened) this.abandon(attempt, "the connection failed");
    };
    watchRefusal(ws, attempt);
    attempt.cancelTimers.push(
      this.timers!.after(this.connectTimeoutMs, () => {
        if (this.current === attempt && (attempt.welcome === null || this.catchUp !== null)) {
          this.abandon(attempt, `no welcome within ${this.connectTimeoutMs} ms`);
        }
      }),
    );
  }

  /** Stops using a socket that is dead or stuck (browsers may take minutes to report a dead
   * socket closed) and goes on as if it had dropped. */
  private abandon(attempt: Attempt, reason: string): void {
    // First let go of it, so that its own close event (perhaps at once) is ignored.
    this.ended(attempt, ABNORMAL_CLOSURE, reason);
    const socket = attempt.ws as WebSocketLike & { terminate?: () => void };
    try {
      if (typeof socket.terminate === "function") socket.terminate();
      else socket.close();
    } catch {
      // Nothing more to do with it.
    }
  }

  /** The socket closed (or was abandoned): decide, per close code or refusal, what comes next. */
  private ended(attempt: Attempt, code: number, reason: string): void {
    this.current = null;
    for (const cancel of attempt.cancelTimers) cancel();
    this.catchUp = null;
    this.rejectAllPending(
      (ref) =>
        new MatchgateError("disconnected", "the connection dropped before the reply; the events tell what happened", {
          ref,
        }),
    );
    const serverHint = this.serverRetryAfterMs;
    this.serverRetryAfterMs = null;

    if (attempt.welcome === null && code === ABNORMAL_CLOSURE) {
      this.refused(attempt, reason);
      return;
    }
    const policy = closePolicy(code);
    const info = { code, reason, policy: policy.name };
    if (policy.action === "stop") {
      this.shutDown(new MatchgateError(policy.name, `closed by the gateway: ${code} ${reason}`.trim()), {
        ...info,
        resume: false,
      });
      return;
    }
    if (policy.action === "restart") this.forgetState();
    if (code === 4008) this.tokens.forget();
    const delay =
      policy.delay === "server" && serverHint !== null
        ? serverHint
        : Math.max(this.nextBackoff(), serverHint ?? 0);
    this.retry({ ...info, resume: this.resumeToken !== null }, delay);
  }

  /** A handshake that failed: by its HTTP status where the platform shows it. */
  private refused(attempt: Attempt, reason: string): void {
    const refusal = attempt.refusal;
    const resume = this.resumeToken !== null;
    if (refusal === null) {
      // Browsers (and Node's own WebSocket) hide the status: the gateway may be down, busy, or
      // may have refused the token. The next attempt, after backoff, gets a fresh token.
      if (!attempt.opened) this.tokens.forget();
      const policy = attempt.opened ? "dropped" : "handshake_failed";
      if (!attempt.opened) this.emit("error", new MatchgateError("handshake_failed", `connection failed: ${reason}`));
      this.retry({ code: ABNORMAL_CLOSURE, reason, policy, resume }, this.nextBackoff());
      return;
    }
    const { status } = refusal;
    const info = { code: ABNORMAL_CLOSURE, reason: refusal.reason ?? reason, status, resume };
    const error = (code: string) =>
      new MatchgateError(code, `handshake refused with HTTP ${status}${refusal.reason ? `: ${refusal.reason}` : ""}`, {
        status,
        ...(refusal.retryAfterMs !== undefined && { retry_after_ms: refusal.retryAfterMs }),
      });
    if (status === 401) {
      // Refused token: ask for a new one. At once if the refused one came from the cache; a
      // fresh token that is refused too waits for the backoff (clock skew, auth trouble).
      this.tokens.forget();
      this.emit("error", error("unauthorized"));
      this.retry({ ...info, policy: "unauthorized" }, attempt.freshToken ? this.nextBackoff() : 0);
    } else if (status === 429 || status === 503) {
      const code = status === 429 ? "rate_limited" : "unavailable";
      this.emit("error", error(code));
      this.retry({ ...info, policy: code }, Math.max(this.nextBackoff(), refusal.retryAfterMs ?? 0));
    } else if (status === 403 || status === 400) {
      // Banned, an origin not allowed, a malformed request: retrying cannot help.
      const code = status === 400 ? "bad_request" : refusal.error === "banned" ? "banned" : "forbidden";
      this.shutDown(error(code), { ...info, policy: code, resume: false });
    } else {
      const code = `http_${status}`;
      this.emit("error", error(code));
      this.retry({ ...info, policy: code }, this.nextBackoff());
    }
  }

  private nextBackoff(): number {
    return backoffDelay(this.failures, this.backoffInitialMs, this.backoffMaxMs);
  }

  /** Schedules the next attempt. */
  private retry(info: Omit<DisconnectInfo, "willReconnect" | "retryInMs">, delay: number): void {
    this.failures += 1;
    this.setState(this.everConnected ? "reconnecting" : "connecting");
    this.emit("disconnected", { ...info, willReconnect: true, retryInMs: delay });
    const timers = this.timers!;
    this.cancelRetry = timers.after(delay, () => {
      this.cancelRetry = null;
      void this.open();
    });
  }

  /** In browsers, come back at once when the network does rather than wait out the backoff. */
  private watchOnline(): void {
    const target = globalThis as { addEventListener?: Function; removeEventListener?: Function };
    if (typeof target.addEventListener !== "function" || typeof target.removeEventListener !== "function") return;
    const onOnline = () => {
      if (this.cancelRetry === null) return;
      this.cancelRetry();
      this.cancelRetry = null;
      void this.open();
    };
    target.addEventListener("online", onOnline);
    this.removeOnlineListener = () => target.removeEventListener!("online", onOnline);
  }

  /** Ends everything: state `closed`, pending requests and `connect()` rejected. */
  private shutDown(error: MatchgateError, info?: Omit<DisconnectInfo, "willReconnect" | "retryInMs">): void {
    this.cancelRetry?.();
    this.cancelRetry = null;
    this.removeOnlineListener?.();
    this.removeOnlineListener = null;
    this.rejectAllPending((ref) => new MatchgateError(error.code, error.message, { ref }));
    this.timers?.dispose();
    this.timers = null;
    this.current = null;
    this.catchUp = null;
    this.forgetState();
    const waiters = this.connectWaiters;
    this.connectWaiters = [];
    for (const waiter of waiters) waiter.reject(error);
    this.setState("closed");
    if (info !== undefined) this.emit("disconnected", { ...info, willReconnect: false });
  }

  /** Forgets the resume token and everything known about the user's state. */
  private forgetState(): void {
    this.resumeToken = null;
    this.lastSeq = 0;
    this._session = null;
    this._proposal = null;
    this.callSignals = [];
    this.protocolState = "idle";
  }

  // --- frames -------------------------------------------------------------------------------

  private receive(attempt: Attempt, data: unknown): void {
    this.lastReceivedAt = Date.now();
    let frame: ServerFrame;
    try {
      frame = JSON.parse(String(data));
    } catch {
      this.emit("error", new MatchgateError("bad_frame", "the gateway sent a frame that is not JSON"));
      return;
    }
    if (attempt.welcome === null) {
      if (frame.type === "welcome") this.welcomed(attempt, frame);
      else if (frame.type === "error") {
        // Refused while attaching (e.g. the backend is down); the close (1013) follows.
        if (frame.retry_after_ms !== undefined) this.serverRetryAfterMs = frame.retry_after_ms;
        this.emit("error", MatchgateError.fromFrame(frame));
      }
      return;
    }
    if ("seq" in frame) {
      // Already seen (a replay overlapping what arrived before the drop): drop it.
      if (frame.seq <= this.lastSeq) return;
      this.lastSeq = frame.seq;
    }
    this.apply(frame);
    const catchUp = this.catchUp;
    if (catchUp !== null && !catchUp.awaitingStatus && (!("seq" in frame) || frame.seq >= catchUp.untilSeq)) {
      // The replay comes right after `welcome`, before any other frame: a frame without `seq`
      // (the heartbeat sent on welcome guarantees one) means it is over.
      this.caughtUp();
    }
  }

  private welcomed(attempt: Attempt, welcome: WelcomeFrame): void {
    attempt.welcome = welcome;
    this._welcome = welcome;
    this.resumeToken = welcome.resume_token;
    this.failures = 0;
    this.everConnected = true;
    const awaitingStatus = !welcome.resumed && welcome.state === "in_session";
    this.catchUp = { untilSeq: welcome.last_seq, serverState: welcome.state, awaitingStatus };
    if (!welcome.resumed) {
      // Nothing is replayed: the state is what `welcome` says; a session has to be asked for.
      this.lastSeq = welcome.last_seq;
      this.protocolState = welcome.state === "in_session" ? "matched" : welcome.state;
      this._proposal = null;
      this.callSignals = [];
      if (!awaitingStatus) this._session = null;
    }
    this.startHeartbeats(attempt, welcome);
    if (awaitingStatus) this.askSession(attempt);
    this.emit("welcome", welcome);
    if (!awaitingStatus && welcome.last_seq <= this.lastSeq) this.caughtUp();
  }

  /** After a reconnect that could not resume into a session: which session is it? */
  private askSession(attempt: Attempt): void {
    const known = this._session;
    this.status().then(
      (status) => {
        if (this.current !== attempt || this.catchUp === null) return;
        if (status.state !== "in_session" || status.session_id === undefined) {
          this._session = null;
        } else if (known?.session_id !== status.session_id) {
          this._session = { session_id: status.session_id, peer: status.peer ?? "", role: status.role ?? "answerer" };
        }
        this.caughtUp();
      },
      () => {
        // The connection dropped again or the gateway did not answer: the next one asks again.
      },
    );
  }

  /** The client knows its state again: adopt the gateway's word where events left doubt. */
  private caughtUp(): void {
    const catchUp = this.catchUp;
    if (catchUp === null) return;
    this.catchUp = null;
    const derived = this.protocolState;
    const agrees =
      (catchUp.serverState === "idle" && derived === "idle") ||
      (catchUp.serverState === "queued" && (derived === "queued" || derived === "proposed")) ||
      (catchUp.serverState === "in_session" && derived === "matched" && this._session !== null);
    if (!agrees) {
      this.protocolState = catchUp.serverState === "in_session" ? "matched" : catchUp.serverState;
      if (this.protocolState !== "matched") this._session = null;
      if (this.protocolState !== "queued") this._proposal = null;
    }
    this.setState(this.protocolState);
    const waiters = this.connectWaiters;
    this.connectWaiters = [];
    for (const waiter of waiters) waiter.resolve(this._welcome!);
  }

  private startHeartbeats(attempt: Attempt, welcome: WelcomeFrame): void {
    const timeout = welcome.heartbeat_timeout_ms;
    const beat = () => {
      this.request<HeartbeatAckFrame>({ type: "heartbeat" }).catch(() => {
        // A lost heartbeat shows as silence, which the tick below notices.
      });
    };
    const tick = () => {
      if (this.current !== attempt) return;
      if (Date.now() - this.lastReceivedAt > timeout) {
        this.abandon(attempt, `nothing received for ${timeout} ms`);
        return;
      }
      beat();
    };
    attempt.cancelTimers.push(this.timers!.every(Math.min(welcome.heartbeat_interval_ms, timeout / 2), tick));
    beat();
  }

  private apply(frame: ServerFrame): void {
    switch (frame.type) {
      case "queued":
        this._proposal = null;
        this.setProtocolState("queued");
        this.emit("queued", frame);
        break;
      case "queue_update":
        this.emit("queue_update", frame);
        break;
      case "dequeued":
        this._proposal = null;
        this.setProtocolState("idle");
        this.emit("dequeued", frame);
        break;
      case "match_proposed":
        this._proposal = frame;
        this.setProtocolState("proposed");
        this.emit("match_proposed", frame);
        break;
      case "match_cancelled":
        this._proposal = null;
        this.setProtocolState(frame.requeued ? "queued" : "idle");
        this.emit("match_cancelled", frame);
        break;
      case "matched":
        this._proposal = null;
        this._session = frame;
        this.callSignals = [];
        this.setProtocolState("matched");
        this.emit("matched", frame);
        break;
      case "session_ended":
        this._session = null;
        this.callSignals = [];
        this.setProtocolState(frame.requeued ? "queued" : "idle");
        this.emit("session_ended", frame);
        break;
      case "peer_status":
        this.emit("peer_status", frame);
        break;
      case "signal":
        if (this.activeCall === null && isCallSignal(frame.payload) && frame.session_id === this._session?.session_id) {
          this.callSignals.push(frame);
          if (this.callSignals.length > CALL_SIGNAL_BUFFER) this.callSignals.shift();
        }
        this.emit("signal", frame);
        break;
      case "chat":
        this.emit("chat", frame);
        break;
      case "reconnect":
        // The close that follows says what to do; this says when.
        this.serverRetryAfterMs = frame.retry_after_ms;
        break;
      case "token_expiring":
        this.tokenExpiring(frame);
        break;
      case "error":
        this.failed(frame);
        return;
      default:
        // welcome, status, ack, heartbeat_ack: replies only; unknown types: newer gateways.
        break;
    }
    if ("ref" in frame && frame.ref !== undefined) this.settle(frame.ref)?.resolve(frame);
  }

  private failed(frame: ErrorFrame): void {
    if (frame.retry_after_ms !== undefined) this.serverRetryAfterMs = frame.retry_after_ms;
    const error = MatchgateError.fromFrame(frame);
    if (frame.ref !== undefined) {
      const pending = this.settle(frame.ref);
      if (pending !== undefined) return pending.reject(error);
    } else if (frame.code === "rate_limited") {
      // The per-connection limit answers without `ref`. The gateway answers a connection's
      // messages in order, so it belongs to the oldest request still waiting for its reply.
      const oldest = this.pending.keys().next();
      if (!oldest.done) {
        this.settle(oldest.value)?.reject(
          new MatchgateError(frame.code, frame.message, { ref: oldest.value, frame, ...(frame.retry_after_ms !== undefined && { retry_after_ms: frame.retry_after_ms }) }),
        );
        return;
      }
    }
    this.emit("error", error);
  }

  private setProtocolState(state: ProtocolState): void {
    this.protocolState = state;
    if (this.catchUp === null) this.setState(state);
  }

  private setState(state: ClientState): void {
    const previous = this._state;
    if (previous === state) return;
    this._state = state;
    const change: StateChange = { previous };
    this.emit("state", state, change);
  }


}

/** With the `ws` package, read the status, `Retry-After` and body of a refused handshake;
 * the standard WebSocket API hides them. */
function watchRefusal(ws: WebSocketLike, attempt: Attempt): void {
  type Response = {
    statusCode: number;
    headers: Record<string, string | string[] | undefined>;
    setEncoding(encoding: string): void;
    on(event: string, fn: (chunk?: string) => void): void;
  };
  const node = ws as WebSocketLike & {
    on?: (event: "unexpected-response", fn: (request: unknown, response: Response) => void) => void;
    terminate?: () => void;
  };
  if (typeof node.on !== "function" || typeof node.terminate !== "function") return;
  node.on("unexpected-response", (_request, response) => {
    const refusal: Refusal = { status: response.statusCode };
    const retryAfter = retryAfterMs(response.headers["retry-after"]);
    if (retryAfter !== undefined) refusal.retryAfterMs = retryAfter;
    attempt.refusal = refusal;
    let body = "";
    response.setEncoding("utf8");
    response.on("data", (chunk) => {
      if (body.length < 4096) body += chunk;
    });
    const done = () => {
      try {
        const json = JSON.parse(body) as { error?: unknown; reason?: unknown; retry_after_ms?: unknown };
        if (typeof json.error === "string") refusal.error = json.error;
        if (typeof json.reason === "string") refusal.reason = json.reason;
        if (typeof json.retry_after_ms === "number") refusal.retryAfterMs = json.retry_after_ms;
      } catch {
        // Not JSON: the status says enough.
      }
      node.terminate!();
    };
    response.on("end", done);
    response.on("error", done);
  });
}

/** `Retry-After` in ms: delay-seconds or an HTTP date. */
function retryAfterMs(header: string | string[] | undefined): number | undefined {
  const value = Array.isArray(header) ? header[0] : header;
  if (value === undefined) return undefined;
  if (/^\d+$/.test(value.trim())) return Number(value) * 1000;
  const date = Date.parse(value);
  return Number.isNaN(date) ? undefined : Math.max(0, date - Date.now());
}

function isCallSignal(payload: unknown): payload is CallSignal {
  const mg = (payload as { mg?: unknown } | null)?.mg;
  return mg === "sdp" || mg === "candidate" || mg === "restart";
}

// ---------------------------------------------------------------------------------------------
// WebRTC calls

/**
 * The WebRTC call of one `p2p` session: an `RTCPeerConnection` built from `media.ice_servers`.
 * The `offerer` (by `matched.role`) makes every offer and the answerer only answers, so offers
 * never cross. ICE candidates trickle through `signal` as they are found. Incoming signals are
 * handled strictly in order on one promise chain (a candidate must not overtake the
 * description it belongs to).
 *
 * Signals are not replayed after a resume, so after either side reconnected into the same
 * session the offerer restarts ICE (a new offer with `iceRestart`): on its own resume, on
 * `peer_status` `connected`, or when the answerer, having resumed, asks with `{mg:"restart"}`.
 * The call closes by itself when the session ends (or the client learns it is over).
 */
export class Call extends Emitter<CallEvents> {
  readonly sessionId: string;
  readonly role: "offerer" | "answerer";
  readonly peerConnection: RTCPeerConnection;
  private _remoteStream: MediaStream | null = null;
  private readonly unsubscribe: Array<() => void> = [];
  private chain: Promise<void> = Promise.resolve();
  private readonly pendingCandidates: RTCIceCandidateInit[] = [];
  private localTracksAdded = false;
  private closed = false;
  /** Whether the peer is known to be connected to the gateway (signals reach it). */
  private peerPresent = true;
  /** An ICE-restart offer that the answerer is sure to get is outstanding. */
  private offerDelivered = false;

  constructor(
    private readonly mg: Matchgate,
    session: SessionInfo,
    iceServers: RTCIceServer[],
    private readonly options: CallOptions,
    buffered: SignalFrame[],
    private readonly detach: () => void,
  ) {
    super();
    const PeerConnection = options.RTCPeerConnection ?? globalThis.RTCPeerConnection;
    if (typeof PeerConnection !== "function") {
      throw new MatchgateError("invalid_state", "no RTCPeerConnection in this runtime: pass `RTCPeerConnection`");
    }
    this.sessionId = session.session_id;
    this.role = session.role;
    const pc = new PeerConnection({ iceServers, iceTransportPolicy: options.iceTransportPolicy ?? "all" });
    this.peerConnection = pc;

    pc.onicecandidate = (event) => this.send({ mg: "candidate", candidate: event.candidate?.toJSON() ?? null });
    pc.ontrack = (event) => {
      const stream = event.streams[0] ?? this._remoteStream ?? new MediaStream();
      if (event.streams[0] === undefined && !stream.getTracks().includes(event.track)) stream.addTrack(event.track);
      if (stream !== this._remoteStream) {
        this._remoteStream = stream;
        this.emit("remote_stream", stream);
      }
    };
    pc.onconnectionstatechange = () => {
      this.emit("state", pc.connectionState);
      if (pc.connectionState === "failed") this.recover();
    };

    this.unsubscribe.push(
      mg.on("signal", (frame) => {
        if (frame.session_id === this.sessionId && isCallSignal(frame.payload)) this.enqueue(frame.payload);
      }),
      mg.on("session_ended", (frame) => {
        if (frame.session_id === this.sessionId) this.finish("session_ended");
      }),
      mg.on("matched", (frame) => {
        if (frame.session_id !== this.sessionId) this.finish("session_ended");
      }),
      mg.on("peer_status", (frame) => {
        if (frame.session_id !== this.sessionId) return;
        this.peerPresent = frame.state === "connected";
        // An offer sent meanwhile may be lost: signals to an absent peer are not kept.
        if (frame.state === "reconnecting") this.offerDelivered = false;
        else this.recover();
      }),
      mg.on("state", (state, change) => {
        if (state === "closed") this.finish("client_closed");
        else if (state === "reconnecting") this.offerDelivered = false;
        else if (state === "matched" && change.previous !== "matched") {
          // Back from a reconnect: the same session means the signals meanwhile were lost.
          if (mg.session?.session_id === this.sessionId) this.recover(true);
          else this.finish("session_ended");
        } else if (state === "idle" || state === "queued" || state === "proposed") this.finish("session_ended");
      }),
    );

    if (this.role === "offerer") {
      this.addLocalTracks(true);
      this.serially(() => this.offer(false));
    }
    for (const frame of buffered) this.enqueue(frame.payload as CallSignal);
  }

  get remoteStream(): MediaStream | null {
    return this._remoteStream;
  }

  /** Closes the peer connection (the session goes on: `skip()` or `end()` for that). The local
   * stream's tracks are the app's and stay as they are. */
  close(): void {
    this.finish("closed");
  }

  private finish(reason: CallCloseReason): void {
    if (this.closed) return;
    this.closed = true;
    for (const unsubscribe of this.unsubscribe) unsubscribe();
    this.detach();
    this.peerConnection.close();
    this.emit("closed", reason);
  }

  /** Restarts ICE after a reconnect of either side: the offerer offers anew, the answerer
   * asks it to (only when it itself came back: `own`). */
  private recover(own = false): void {
    if (this.closed) return;
    if (this.role === "offerer") this.serially(() => this.offer(true));
    else if (own) this.send({ mg: "restart" });
  }

  private addLocalTracks(offerer: boolean): void {
    if (this.localTracksAdded) return;
    this.localTracksAdded = true;
    const stream = this.options.localStream;
    for (const kind of ["audio", "video"] as const) {
      const tracks = stream?.getTracks().filter((t) => t.kind === kind) ?? [];
      for (const track of tracks) this.peerConnection.addTrack(track, stream!);
      // With nothing of a kind to send, the offerer still asks to receive it.
      if (tracks.length === 0 && offerer) this.peerConnection.addTransceiver(kind, { direction: "recvonly" });
    }
  }

  private async offer(iceRestart: boolean): Promise<void> {
    const pc = this.peerConnection;
    if (this.closed) return;
    if (iceRestart) {
      // To a peer that is away it would be lost: its `peer_status` `connected` triggers it.
      if (!this.peerPresent) return;
      // Asked for again while the last one is on its way to a present peer, it would only
      // cross it; one that may have been lost (peer away, own reconnect) is redone.
      if (pc.signalingState === "have-local-offer" && this.offerDelivered) return;
    }
    const offer = await pc.createOffer({ iceRestart });
    await pc.setLocalDescription(offer);
    this.offerDelivered = this.peerPresent && this.mg.state === "matched";
    this.send({ mg: "sdp", description: { type: "offer", sdp: pc.localDescription!.sdp } });
  }

  private enqueue(signal: CallSignal): void {
    this.serially(() => this.handle(signal));
  }

  private serially(step: () => Promise<void>): void {
    this.chain = this.chain.then(step).catch((e: unknown) => {
      if (!this.closed) this.emit("error", e instanceof Error ? e : new Error(String(e)));
    });
  }

  private async handle(signal: CallSignal): Promise<void> {
    if (this.closed) return;
    this.peerPresent = true; // it just sent this
    const pc = this.peerConnection;
    switch (signal.mg) {
      case "sdp": {
        const { description } = signal;
        if (description.type === "offer") {
          if (this.role === "offerer") return; // Offers come from the offerer only.
          await pc.setRemoteDescription(description);
          // Added after the offer so that they ride on the transceivers it created.
          this.addLocalTracks(false);
          await pc.setLocalDescription(await pc.createAnswer());
          this.send({ mg: "sdp", description: { type: "answer", sdp: pc.localDescription!.sdp } });
        } else {
          // An answer to an offer that a newer one replaced is dropped.
          if (this.role !== "offerer" || pc.signalingState !== "have-local-offer") return;
          await pc.setRemoteDescription(description);
          this.offerDelivered = false;
        }
        for (const candidate of this.pendingCandidates.splice(0)) await this.addCandidate(candidate);
        return;
      }
      case "candidate":
        if (signal.candidate === null) return;
        if (pc.remoteDescription === null) this.pendingCandidates.push(signal.candidate);
        else await this.addCandidate(signal.candidate);
        return;
      case "restart":
        if (this.role === "offerer") await this.offer(true);
        return;
    }
  }

  private async addCandidate(candidate: RTCIceCandidateInit): Promise<void> {
    try {
      await this.peerConnection.addIceCandidate(candidate);
    } catch {
      // A candidate of an ICE generation that a restart replaced: harmless.
    }
  }

  private send(signal: CallSignal): void {
    if (this.closed) return;
    this.mg.signal(signal as unknown as Record<string, unknown>).catch((e: MatchgateError) => {
      // Lost with a dropped connection: the restart after the reconnect sends what matters.
      if (e.code !== "disconnected" && e.code !== "not_connected" && !this.closed) this.emit("error", e);
    });
  }
}

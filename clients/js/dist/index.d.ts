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
import type { AckFrame, DequeuedFrame, EnqueueMessage, ErrorFrame, MatchProposedFrame, QueuedFrame, ReportMessage, SessionEndedFrame, SignalFrame, StatusFrame, WelcomeFrame } from "./protocol.gen.js";
import type { CallEvents, CallOptions, ClientState, MatchgateEvents, MatchgateOptions, SessionInfo } from "./types.js";
export type * from "./protocol.gen.js";
export type * from "./types.js";
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
export declare class MatchgateError extends Error {
    readonly name = "MatchgateError";
    readonly code: string;
    readonly retry_after_ms?: number;
    readonly ref?: string;
    /** HTTP status of a refused handshake, when known. */
    readonly status?: number;
    /** The gateway's `error` frame, when this error is one. */
    readonly frame?: ErrorFrame;
    constructor(code: string, message: string, extra?: {
        retry_after_ms?: number;
        ref?: string;
        status?: number;
        frame?: ErrorFrame;
        cause?: unknown;
    });
    static fromFrame(frame: ErrorFrame): MatchgateError;
}
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
export declare const CLOSE_POLICIES: Readonly<Record<number, ClosePolicy>>;
export declare function closePolicy(code: number): ClosePolicy;
/** Jittered exponential backoff: the first retry within `initial`, then half to all of
 * `initial * 2^attempt`, capped at `max`. */
export declare function backoffDelay(attempt: number, initialMs: number, maxMs: number): number;
type Handler = (...args: any[]) => void;
/** Typed events: `on` returns a function that unsubscribes. A handler that throws does not
 * stop the others or the client; its error is rethrown on its own. */
declare class Emitter<Events extends {
    [E in keyof Events]: Handler;
}> {
    private readonly handlers;
    on<E extends keyof Events>(event: E, handler: Events[E]): () => void;
    off<E extends keyof Events>(event: E, handler: Events[E]): void;
    protected emit<E extends keyof Events>(event: E, ...args: Parameters<Events[E]>): void;
}
export declare class Matchgate extends Emitter<MatchgateEvents> {
    private readonly url;
    private readonly WebSocketImpl;
    private readonly tokens;
    private readonly requestTimeoutMs;
    private readonly connectTimeoutMs;
    private readonly backoffInitialMs;
    private readonly backoffMaxMs;
    private readonly useWorkerTimers;
    private timers;
    private current;
    private cancelRetry;
    private removeOnlineListener;
    private failures;
    private everConnected;
    private connectWaiters;
    private _state;
    private protocolState;
    private catchUp;
    private _welcome;
    private resumeToken;
    private lastSeq;
    private _session;
    private _proposal;
    /** `retry_after_ms` of the `reconnect` or `error` frame that came before a close. */
    private serverRetryAfterMs;
    private lastReceivedAt;
    private readonly pending;
    private readonly refPrefix;
    private refCounter;
    /** Call-helper signals of the current session that arrived before `call()`. */
    private callSignals;
    private activeCall;
    constructor(options: MatchgateOptions);
    get state(): ClientState;
    /** The `welcome` of the current (or last) connection. */
    get welcome(): WelcomeFrame | null;
    /** The current session, while `state` is `matched` (kept while reconnecting). */
    get session(): SessionInfo | null;
    /** The open proposal, while `state` is `proposed`. */
    get proposal(): MatchProposedFrame | null;
    /**
     * Connects (if not connected yet) and resolves with the `welcome` once the client knows its
     * state. Failed attempts are retried with backoff meanwhile (see the `disconnected` and
     * `error` events); it rejects when the client ends up `closed` first.
     */
    connect(): Promise<WelcomeFrame>;
    /**
     * Closes the connection and stays closed. The gateway holds the user's queue place or
     * session for its resume grace period, as after any disconnect: call `end()` first to leave.
     */
    close(): void;
    /** Joins the queue. Resolves with `queued`. */
    enqueue(prefs?: EnqueueMessage["prefs"]): Promise<QueuedFrame>;
    /** Ends the session and looks for someone else. Resolves with `session_ended` (`skip`). */
    skip(): Promise<SessionEndedFrame>;
    /** Leaves the queue or the session. Resolves with `dequeued` or `session_ended`. */
    end(): Promise<DequeuedFrame | SessionEndedFrame>;
    /** Blocks the peer of the current (else the most recent) session, or of `sessionId`. */
    block(sessionId?: string): Promise<AckFrame>;
    /** Reports the peer of the current (else the most recent) session, or of `sessionId`. */
    report(reason: ReportMessage["reason"], details?: string, sessionId?: string): Promise<AckFrame>;
    /** Accepts the open proposal (or `matchId`). Resolves with `ack`; `matched` follows. */
    accept(matchId?: string): Promise<AckFrame>;
    /** Declines the open proposal (or `matchId`). Resolves with `ack`. */
    decline(matchId?: string): Promise<AckFrame>;
    /** Sends `payload` (a JSON object) to the peer of the current session. Resolves with `ack`. */
    signal(payload: Record<string, unknown>): Promise<AckFrame>;
    /** Sends a chat message (1 to 1000 characters) to the peer. Resolves with `ack`. */
    chat(text: string): Promise<AckFrame>;
    /** Asks where the user stands. Resolves with `status`. */
    status(): Promise<StatusFrame>;
    /**
     * Gives the live connection a new token from `getToken` (never the cached one), for the same
     * user. Resolves with `ack` (action `refresh`); rejects with `unauthorized` when the gateway
     * refuses it (the connection then keeps its old token), or `token_failed`. The client does
     * this by itself on `token_expiring`.
     */
    refreshToken(): Promise<AckFrame>;
    /** `token_expiring`: refresh now; what fails is reported as an `error` event. */
    private tokenExpiring;
    /**
     * Starts the WebRTC call of the current `p2p` session (see `Call`). Throws when not in a
     * session or when the session's media is not `p2p` (LiveKit: use a LiveKit SDK).
     */
    call(options?: CallOptions): Call;
    private answerProposal;
    private request;
    /** The connection requests go over, once it has been welcomed. */
    private connected;
    private notConnected;
    /** A frame over the gateway's limit would close the connection (1009): refuse it here. */
    private oversize;
    private settle;
    private rejectAllPending;
    private isReady;
    private open;
    /** Stops using a socket that is dead or stuck (browsers may take minutes to report a dead
     * socket closed) and goes on as if it had dropped. */
    private abandon;
    /** The socket closed (or was abandoned): decide, per close code or refusal, what comes next. */
    private ended;
    /** A handshake that failed: by its HTTP status where the platform shows it. */
    private refused;
    private nextBackoff;
    /** Schedules the next attempt. */
    private retry;
    /** In browsers, come back at once when the network does rather than wait out the backoff. */
    private watchOnline;
    /** Ends everything: state `closed`, pending requests and `connect()` rejected. */
    private shutDown;
    /** Forgets the resume token and everything known about the user's state. */
    private forgetState;
    private receive;
    private welcomed;
    /** After a reconnect that could not resume into a session: which session is it? */
    private askSession;
    /** The client knows its state again: adopt the gateway's word where events left doubt. */
    private caughtUp;
    private startHeartbeats;
    private apply;
    private failed;
    private setProtocolState;
    private setState;
}
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
export declare class Call extends Emitter<CallEvents> {
    private readonly mg;
    private readonly options;
    private readonly detach;
    readonly sessionId: string;
    readonly role: "offerer" | "answerer";
    readonly peerConnection: RTCPeerConnection;
    private _remoteStream;
    private readonly unsubscribe;
    private chain;
    private readonly pendingCandidates;
    private localTracksAdded;
    private closed;
    /** Whether the peer is known to be connected to the gateway (signals reach it). */
    private peerPresent;
    /** An ICE-restart offer that the answerer is sure to get is outstanding. */
    private offerDelivered;
    constructor(mg: Matchgate, session: SessionInfo, iceServers: RTCIceServer[], options: CallOptions, buffered: SignalFrame[], detach: () => void);
    get remoteStream(): MediaStream | null;
    /** Closes the peer connection (the session goes on: `skip()` or `end()` for that). The local
     * stream's tracks are the app's and stay as they are. */
    close(): void;
    private finish;
    /** Restarts ICE after a reconnect of either side: the offerer offers anew, the answerer
     * asks it to (only when it itself came back: `own`). */
    private recover;
    private addLocalTracks;
    private offer;
    private enqueue;
    private serially;
    private handle;
    private addCandidate;
    private send;
}

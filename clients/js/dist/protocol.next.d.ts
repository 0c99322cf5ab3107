/** One entry of `media.ice_servers`: the browser's `RTCIceServer`. */
export interface IceServer {
    urls: string | string[];
    username?: string;
    credential?: string;
}
/** `matched.media` without LiveKit: the clients set up the call themselves. */
export interface P2pMedia {
    provider: "p2p";
    /** STUN and TURN servers for `RTCPeerConnection` (TURN with time-limited credentials). */
    ice_servers: IceServer[];
}
/** Client to server: relay `payload` to the peer of the current session. Reply: `ack`. */
export interface SignalMessage {
    type: "signal";
    payload: Record<string, unknown>;
    ref?: string;
}
/** Client to server: a text message (1 to 1000 characters) for the peer. Reply: `ack`. */
export interface ChatMessage {
    type: "chat";
    text: string;
    ref?: string;
}
/** Server to client: the peer's `signal` payload. No `seq`: not logged, not replayed. */
export interface SignalFrame {
    type: "signal";
    session_id: string;
    payload: Record<string, unknown>;
}
/** Server to client: the peer's chat message. No `seq`: never stored, not replayed. */
export interface ChatFrame {
    type: "chat";
    session_id: string;
    text: string;
    sent_at_ms: number;
}

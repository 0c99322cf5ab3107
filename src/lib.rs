//! matchgate: a realtime matchmaking gateway for random video chat.
//!
//! Layers, from the socket inwards:
//! - [`server`] binds, serves and drains (and bounds the sockets that are not WebSockets yet);
//!   [`http`] holds the endpoints and the handshake (auth, origin, capacity); [`connection`]
//!   owns one WebSocket; [`address`] says how client addresses count for limits and bans.
//! - [`protocol`] is the wire contract (mirrored by the JSON Schemas in `protocol/`).
//! - [`gateway`] turns requests into matching operations and runs timers (grace, queue
//!   updates); it is where the transport meets the domain.
//! - [`matching`] (state: queue, sessions, event logs; four small traits bundled as
//!   [`matching::Engine`]) and [`bus`] (delivery to wherever a user's connection lives) are
//!   narrow traits with swappable backends; [`registry`] maps users to this instance's live
//!   connections. [`ids`] is the leaf they all share (user and connection ids, frames);
//!   [`attributes`] the leaf with what a token says about a user and the `want` rule.
//! - [`scaleout`] wires the Redis backends together and runs each instance's heartbeat,
//!   clean-up and recovery loops; [`redis_keys`] names every Redis key and channel and encodes
//!   what travels on pub/sub.
//! - [`shutdown`] signals the drain and runs the background work (timers, rooms, loops) the
//!   drain cancels and awaits.
//! - [`moderation`] (reports and bans, in memory or in Redis) is another narrow backend trait;
//!   [`privacy`] decides how identities appear in logs.
//! - [`livekit`] and [`p2p`] are the two media modes: LiveKit rooms, or direct WebRTC with the
//!   ICE servers and TURN credentials `matched` carries.
//! - [`ledger`] records sessions, blocks, reports and bans in PostgreSQL, off the hot path.
//! - [`config`] flattens one section per module (each defined next to its module) into the
//!   command line; only [`server`] reads all of it. [`flags`] is the leaf with the value
//!   parsers every section uses.

pub mod address;
pub mod attributes;
pub mod auth;
pub mod backoff;
pub mod bus;
pub mod clock;
pub mod config;
pub mod connection;
pub mod flags;
pub mod gateway;
pub mod http;
pub mod ids;
pub mod ledger;
pub mod livekit;
pub mod matching;
pub mod metrics;
pub mod moderation;
pub mod p2p;
pub mod privacy;
pub mod protocol;
pub mod ratelimit;
pub mod redis_keys;
pub mod registry;
pub mod scaleout;
pub mod server;
pub mod shutdown;
pub mod tls;
pub mod webhooks;

pub use config::Config;
pub use server::Server;

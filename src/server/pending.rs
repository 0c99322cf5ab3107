//! Caps on TCP connections that have not become WebSockets: those still sending a request and
//! those idle between keep-alive HTTP requests. `--max-connections` counts WebSockets only, so
//! without these a client could hold any number of sockets (and their buffers) by never
//! finishing a request.
//!
//! A connection takes a [`Pending`] slot when it is accepted, before a byte is read, and gives
//! it back when it upgrades to a WebSocket or closes. Two caps apply: one per listener
//! (`--max-pending-connections`) and one per client address (`--max-pending-per-address`),
//! so that one address cannot take the whole budget. At accept time only the TCP peer is
//! known (an `X-Forwarded-For` header has not arrived yet), so the per-address cap counts the
//! peer, keyed like every per-address limit ([`AddressKeys`]); peers in `--trusted-proxies`
//! are exempt from it, since a load balancer carries everybody's connections.
//!
//! The per-address counts live in a map with one entry per address that has a pending
//! connection, dropped when its last one ends: it never holds more entries than the listener
//! cap.

use std::net::IpAddr;
use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use ipnet::IpNet;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::address::AddressKeys;

/// Which cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener has `--max-pending-connections` already.
    Listener,
    /// The client address has `--max-pending-per-address` already.
    Address,
}

impl Refusal {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Listener => "listener",
            Refusal::Address => "address",
        }
    }

    /// What the refused client is told before the socket closes: a complete response, so
    /// that an HTTP client shows a status instead of a reset.
    pub fn response(self) -> &'static [u8] {
        match self {
            Refusal::Listener => b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            Refusal::Address => b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
        }
    }
}

/// The caps of one listener.
pub struct PendingLimits {
    slots: Arc<Semaphore>,
    /// `None`: no per-address cap (the internal listener).
    per_address: Option<usize>,
    counts: DashMap<IpNet, usize>,
    keys: AddressKeys,
    trusted: Vec<IpNet>,
    /// Connections holding a slot.
    gauge: Gauge,
}

/// A pending connection's slot, given back on drop.
pub struct Pending {
    limits: Arc<PendingLimits>,
    /// The address counted, if the per-address cap applies to it.
    address: Option<IpNet>,
    _slot: OwnedSemaphorePermit,
}

impl PendingLimits {
    pub fn new(
        max: usize,
        per_address: Option<usize>,
        keys: AddressKeys,
        trusted: Vec<IpNet>,
        gauge: Gauge,
    ) -> Arc<Self> {
        Arc::new(PendingLimits {
            slots: Arc::new(Semaphore::new(max)),
            per_address,
            counts: DashMap::new(),
            keys,
            trusted,
            gauge,
        })
    }

    /// Admits a connection from `peer`, or says which cap refuses it.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Pending, Refusal> {
        let slot = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Listener)?;
        let peer = peer.to_canonical();
        let address = match self.per_address {
            Some(cap) if !self.trusted.iter().any(|net| net.contains(&peer)) => {
                let key = self.keys.key(peer);
                match self.counts.entry(key) {
                    Entry::Occupied(entry) if *entry.get() >= cap => return Err(Refusal::Address),
                    Entry::Occupied(mut entry) => *entry.get_mut() += 1,
                    Entry::Vacant(entry) => {
                        entry.insert(1);
                    }
                }
                Some(key)
            }
            _ => None,
        };
        self.gauge.inc();
        Ok(Pending {
            limits: self.clone(),
            address,
            _slot: slot,
        })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.limits.gauge.dec();
        if let Some(key) = self.address {
            if let Entry::Occupied(mut entry) = self.limits.counts.entry(key) {
                if *entry.get() <= 1 {
                    entry.remove();
                } else {
                    *entry.get_mut() -= 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, per_address: Option<usize>) -> Arc<PendingLimits> {
        PendingLimits::new(
            max,
            per_address,
            AddressKeys::new(64),
            vec!["10.0.0.0/8".parse().unwrap()],
            Gauge::default(),
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn caps_each_address_and_the_listener_and_forgets_addresses_without_connections() {
        let l = limits(5, Some(2));
        let a1 = l.admit(ip("192.0.2.1")).unwrap();
        let _a2 = l.admit(ip("::ffff:192.0.2.1")).unwrap();
        assert_eq!(l.admit(ip("192.0.2.1")).err(), Some(Refusal::Address));
        // One IPv6 client is its /64.
        let _b1 = l.admit(ip("2001:db8::1")).unwrap();
        let _b2 = l.admit(ip("2001:db8::2")).unwrap();
        assert_eq!(l.admit(ip("2001:db8::3")).err(), Some(Refusal::Address));
        // Trusted proxies only count against the listener cap.
        let _proxy = l.admit(ip("10.0.0.5")).unwrap();
        assert_eq!(l.admit(ip("10.0.0.5")).err(), Some(Refusal::Listener));
        assert_eq!(l.gauge.get(), 5);
        drop(a1);
        let _a3 = l.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(l.counts.len(), 2);
        drop((_a2, _a3, _b1, _b2, _proxy));
        assert!(l.counts.is_empty(), "no entry outlives its connections");
        assert_eq!(l.gauge.get(), 0);
    }

    #[test]
    fn without_a_per_address_cap_only_the_listener_counts() {
        let l = limits(2, None);
        let _a = l.admit(ip("192.0.2.1")).unwrap();
        let _b = l.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(l.admit(ip("192.0.2.2")).err(), Some(Refusal::Listener));
        assert!(l.counts.is_empty());
    }
}

//! Which address a handshake comes from, for the per-address limit, address bans and logs.
//!
//! Without trusted proxies it is the TCP peer. Behind a load balancer the peer is the balancer,
//! so when the peer is one of `--trusted-proxies`, the address comes from `X-Forwarded-For`:
//! read from the right (the hop nearest to us), skipping trusted proxies, the first address
//! that is not one of ours is the client. Entries further left were written by the client
//! itself and prove nothing, so they are never read past an untrusted hop.

use std::net::IpAddr;

use axum::http::HeaderMap;
use ipnet::IpNet;

pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    let mut client = peer.to_canonical();
    if !is_trusted(&client) {
        return client;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    for hop in hops.iter().rev() {
        let Ok(ip) = hop.trim().parse::<IpAddr>() else {
            // Garbage from a hop we trust: stop at the last address we could read.
            break;
        };
        client = ip.to_canonical();
        if !is_trusted(&client) {
            break;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    #[test]
    fn reads_forwarded_for_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let lb: IpAddr = "10.0.0.5".parse().unwrap();
        let outsider: IpAddr = "203.0.113.9".parse().unwrap();
        // Not through a trusted proxy: the header is ignored.
        let h = headers(&["198.51.100.1"]);
        assert_eq!(client_ip(outsider, &h, &trusted), outsider);
        // Through the balancer: the nearest untrusted hop, not what the client wrote before it.
        let h = headers(&["1.1.1.1, 198.51.100.7", "10.0.0.9"]);
        assert_eq!(client_ip(lb, &h, &trusted).to_string(), "198.51.100.7");
        // No header, or garbage: the nearest readable hop.
        assert_eq!(client_ip(lb, &HeaderMap::new(), &trusted), lb);
        let h = headers(&["nonsense, 10.0.0.7"]);
        assert_eq!(client_ip(lb, &h, &trusted).to_string(), "10.0.0.7");
        // IPv4-mapped IPv6 peers count as their IPv4 address.
        let mapped: IpAddr = "::ffff:10.0.0.5".parse().unwrap();
        let h = headers(&["198.51.100.8"]);
        assert_eq!(client_ip(mapped, &h, &trusted).to_string(), "198.51.100.8");
    }
}

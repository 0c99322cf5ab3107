//! Client addresses as the per-address limits and address bans count them.
//!
//! An IPv4 address is one client. An IPv6 client, though, is handed a whole prefix by its
//! provider (a /64 at least, often a /56 or a /48) and can take a fresh address for every
//! attempt: keyed by the exact address it would get a fresh handshake budget each time, walk
//! past any address ban, and add a limiter entry per address. So an IPv6 address counts as its
//! first `--ipv6-prefix-len` bits (default 64), everywhere a client address is a key: the
//! limit on connection attempts, the cap on connections not upgraded yet, and bans. An
//! IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is the IPv4 address.
//!
//! An address ban names a network: a single IPv4 address, an IPv6 prefix of the key length (a
//! ban of one IPv6 address covers its whole prefix), or a wider range (CIDR, IPv4 /8 to /31,
//! IPv6 /16 up to the key length). A client is banned when any network covering its address
//! is, which is a fixed number of exact lookups ([`AddressKeys::covering`]: at most 25 for
//! IPv4 and 113 for IPv6) however many bans and connections there are.

use std::net::IpAddr;

use ipnet::IpNet;

/// The widest IPv4 range a ban may name.
pub const MIN_IPV4_BAN_PREFIX: u8 = 8;
/// The widest IPv6 range a ban may name.
pub const MIN_IPV6_BAN_PREFIX: u8 = 16;

/// Maps client addresses to the networks they count as. See the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressKeys {
    ipv6_prefix: u8,
}

impl AddressKeys {
    /// Keys with IPv6 addresses counted by their first `ipv6_prefix` bits (at most 128, at
    /// least [`MIN_IPV6_BAN_PREFIX`]; the configuration checks it).
    pub fn new(ipv6_prefix: u8) -> Self {
        debug_assert!((MIN_IPV6_BAN_PREFIX..=128).contains(&ipv6_prefix));
        AddressKeys { ipv6_prefix }
    }

    /// The network `ip` counts as: an IPv4 address as itself, an IPv6 address as its prefix.
    pub fn key(&self, ip: IpAddr) -> IpNet {
        let ip = ip.to_canonical();
        let len = match ip {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => self.ipv6_prefix,
        };
        net(ip, len)
    }

    /// Every network an address ban may name that covers `ip`, narrowest first: for IPv4 the
    /// address, then /31 to /8; for IPv6 the exact address (bans made before addresses were
    /// keyed by prefix name one), then the key prefix, then every shorter one down to /16.
    pub fn covering(&self, ip: IpAddr) -> Vec<IpNet> {
        let ip = ip.to_canonical();
        let (exact, widest, narrowest) = match ip {
            IpAddr::V4(_) => (None, MIN_IPV4_BAN_PREFIX, 32),
            IpAddr::V6(_) => (
                (self.ipv6_prefix < 128).then(|| net(ip, 128)),
                MIN_IPV6_BAN_PREFIX,
                self.ipv6_prefix,
            ),
        };
        exact
            .into_iter()
            .chain((widest..=narrowest).rev().map(|len| net(ip, len)))
            .collect()
    }

    /// The network an address ban of `value` names: an address (its key network) or a CIDR
    /// range (host bits dropped; an IPv6 range narrower than the key prefix widened to it), or
    /// why it cannot be one.
    pub fn ban_network(&self, value: &str) -> Result<IpNet, String> {
        let parsed = match value.parse::<IpNet>() {
            Ok(range) => range,
            Err(_) => match value.parse::<IpAddr>() {
                Ok(ip) => return Ok(self.key(ip)),
                Err(_) => {
                    return Err(format!(
                        "{value:?} is neither an IP address nor a CIDR range"
                    ))
                }
            },
        };
        let range = match parsed {
            // `::ffff:10.0.0.0/104` is 10.0.0.0/8.
            IpNet::V6(v6) if v6.prefix_len() >= 96 && v6.addr().to_ipv4_mapped().is_some() => {
                net(IpAddr::V6(v6.addr()).to_canonical(), v6.prefix_len() - 96)
            }
            other => other.trunc(),
        };
        let widest = match range {
            IpNet::V4(_) => MIN_IPV4_BAN_PREFIX,
            IpNet::V6(_) => MIN_IPV6_BAN_PREFIX,
        };
        if range.prefix_len() < widest {
            return Err(format!(
                "{value:?} is too wide a range: IPv4 ranges go down to /{MIN_IPV4_BAN_PREFIX}, IPv6 ranges to /{MIN_IPV6_BAN_PREFIX}"
            ));
        }
        Ok(match range {
            IpNet::V6(_) if range.prefix_len() > self.ipv6_prefix => {
                net(range.addr(), self.ipv6_prefix)
            }
            _ => range,
        })
    }
}

/// `ip` truncated to `len` bits (at most the family's width).
fn net(ip: IpAddr, len: u8) -> IpNet {
    IpNet::new(ip, len)
        .expect("prefix lengths here never exceed the address width")
        .trunc()
}

/// A network as bans write it: a single address without its `/32` or `/128`, so that bans of
/// single addresses read (and are stored) as the address.
pub fn ban_text(network: IpNet) -> String {
    if network.prefix_len() == network.max_prefix_len() {
        network.addr().to_string()
    } else {
        network.to_string()
    }
}

/// Reads [`ban_text`] back.
pub fn parse_ban_text(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_counts_by_prefix_and_mapped_ipv4_as_ipv4() {
        let keys = AddressKeys::new(64);
        assert_eq!(keys.key(ip("10.0.0.1")).to_string(), "10.0.0.1/32");
        assert_eq!(keys.key(ip("::ffff:10.0.0.1")).to_string(), "10.0.0.1/32");
        assert_eq!(
            keys.key(ip("2001:db8::1")),
            keys.key(ip("2001:db8::ffff:2")),
            "one /64"
        );
        assert_ne!(keys.key(ip("2001:db8::1")), keys.key(ip("2001:db8:0:1::1")));
        assert_eq!(keys.key(ip("2001:db8::1")).to_string(), "2001:db8::/64");
        assert_eq!(
            AddressKeys::new(128).key(ip("2001:db8::1")).to_string(),
            "2001:db8::1/128"
        );
    }

    #[test]
    fn ban_values_are_networks_a_key_can_fall_into() {
        let keys = AddressKeys::new(64);
        let text = |v: &str| keys.ban_network(v).map(ban_text);
        assert_eq!(text("10.0.0.1").unwrap(), "10.0.0.1");
        assert_eq!(text("::ffff:10.0.0.1").unwrap(), "10.0.0.1");
        assert_eq!(
            text("10.1.2.3/16").unwrap(),
            "10.1.0.0/16",
            "host bits dropped"
        );
        assert_eq!(text("::ffff:10.0.0.0/104").unwrap(), "10.0.0.0/8");
        assert_eq!(text("2001:db8::1").unwrap(), "2001:db8::/64");
        assert_eq!(
            text("2001:DB8:0:0::1/128").unwrap(),
            "2001:db8::/64",
            "widened"
        );
        assert_eq!(text("2001:db8::/48").unwrap(), "2001:db8::/48");
        assert!(text("10.0.0.0/7").is_err());
        assert!(text("2001::/15").is_err());
        assert!(text("10.0.0.256").is_err());
        assert!(text("nonsense").is_err());
        assert_eq!(
            parse_ban_text("10.0.0.1"),
            Some("10.0.0.1/32".parse().unwrap())
        );
        assert_eq!(
            parse_ban_text("2001:db8::/64"),
            keys.ban_network("2001:db8::9").ok()
        );
    }

    #[test]
    fn covering_networks_include_every_ban_that_holds() {
        let keys = AddressKeys::new(64);
        let v4 = keys.covering(ip("10.1.2.3"));
        assert_eq!(v4.len(), 25);
        assert_eq!(ban_text(v4[0]), "10.1.2.3");
        assert!(v4.contains(&keys.ban_network("10.1.0.0/16").unwrap()));
        assert!(v4.contains(&keys.ban_network("10.0.0.0/8").unwrap()));
        let v6 = keys.covering(ip("2001:db8:1:2::9"));
        assert_eq!(v6.len(), 1 + 64 - 16 + 1);
        assert_eq!(
            ban_text(v6[0]),
            "2001:db8:1:2::9",
            "bans of exact addresses"
        );
        for banned in ["2001:db8:1:2::1", "2001:db8::/32", "2001:db8:1::/48"] {
            assert!(v6.contains(&keys.ban_network(banned).unwrap()), "{banned}");
        }
        assert!(!v6.contains(&keys.ban_network("2001:db8:1:3::1").unwrap()));
        for net in keys.covering(ip("::ffff:10.1.2.3")) {
            assert!(net.addr().is_ipv4());
        }
        assert_eq!(AddressKeys::new(128).covering(ip("2001:db8::1")).len(), 113);
    }
}

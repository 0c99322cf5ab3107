//! The Redis side of the scale-out mode as names and bytes, for the Rust code: the key layout
//! of one deployment, its pub/sub channels, and the encoding of what travels on them.
//!
//! The matching engine ([`crate::matching::redis`]), the moderation backend
//! ([`crate::moderation::redis`]), the subscriber ([`crate::bus::redis`]), the shared dev
//! secret (`auth`) and the webhook outbox (`webhooks`) all take their names from here, so that
//! none of them depends on another for a key or a message format. Those besides the engine get the Redis itself as a
//! [`Deployment`] (nodes and layout), so they need no configuration section of another module.
//! The two Lua libraries build the keys they touch inside their atomic step from the prefix
//! and channel prefix passed in each call: `src/matching/lua/keys.lua` documents its keys in its
//! "Key layout" comment and `src/matching/lua/events.lua` writes the frame and kick notices in
//! its `publish` calls (`'F' .. user .. '\n' .. seq .. '\n' .. text` and `'K' .. user .. '\n' ..
//! conn`), sent once per instance and call by `publish_all`, several in one message as
//! [`Notice::encode_all`] writes them; `src/moderation/redis.lua` publishes the ban notice it
//! is handed, which [`Notice::Ban`] encodes. The tests `tests/redis_keys.rs` and
//! `tests/group_commit.rs` publish frames and kicks from the matching library and decode them
//! with [`Notice::decode_all`], so the two sides cannot drift apart.
//!
//! Every key starts with the deployment's hash tag `{<namespace>}`, so one call touches one
//! slot and the same code runs against Redis Cluster. A deployment whose matching state is
//! partitioned (`--redis-partitions`, see [`crate::matching::partitioned`]) gives each
//! partition's matching keys a hash tag of its own ([`Layout::partition`]), picked so that the
//! partitions' slots spread evenly over the slot range, hence over the masters of a cluster
//! that splits the slots evenly; everything else keeps the deployment's tag.

use crate::ids::ConnId;

/// Where the Redis keys and channels of one deployment live.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Key prefix with the hash tag, e.g. `{mg}`.
    pub prefix: String,
    /// Pub/sub channel prefix; an instance listens on `<prefix><instance id>`.
    pub channel_prefix: String,
    /// The channel every instance listens on besides its own (ban notices).
    broadcast: String,
    /// In a partitioned deployment, the partition whose matching keys this layout names (the
    /// matching library marks the session ids it makes with it); `None` with one partition.
    pub partition: Option<usize>,
}

/// The slots of Redis Cluster.
pub const SLOTS: u16 = 16384;

impl Layout {
    pub fn new(namespace: &str) -> Self {
        Layout {
            prefix: format!("{{{namespace}}}"),
            channel_prefix: format!("{namespace}:i:"),
            broadcast: format!("{namespace}:all"),
            partition: None,
        }
    }

    /// The layout of partition `index` of `count` (`count` >= 1): the same channels, and a
    /// hash tag whose slot lies in the middle half of the `index`-th of `count` equal ranges
    /// of the slots, so that the partitions of a cluster whose masters split the slots about
    /// evenly (as `redis-cli --cluster create` does, give or take a slot at the borders) spread
    /// over the masters, a whole number of partitions per master when `count` is a multiple
    /// of the masters. The tag is the first of `<ns>`
    /// (partition 0 only: one partition is the unpartitioned layout, and partition 0 keeps it
    /// when its slot fits), `<ns>.<index>`, `<ns>.<index>.1`, `<ns>.<index>.2`, ... whose
    /// slot fits; a namespace cannot contain `.`, so no tag is another deployment's.
    pub fn partition(&self, index: usize, count: usize) -> Layout {
        assert!(index < count, "partition {index} of {count}");
        let namespace = &self.prefix[1..self.prefix.len() - 1];
        let fits = |tag: &str| {
            let quarter = usize::from(slot(tag)) * count * 4 / usize::from(SLOTS);
            quarter / 4 == index && matches!(quarter % 4, 1 | 2)
        };
        let candidates = (index == 0)
            .then(|| namespace.to_string())
            .into_iter()
            .chain((0..).map(|k| match k {
                0 => format!("{namespace}.{index}"),
                k => format!("{namespace}.{index}.{k}"),
            }));
        let tag = candidates
            .into_iter()
            .find(|tag| count == 1 || fits(tag))
            .expect("some candidate hashes into every range");
        Layout {
            prefix: format!("{{{tag}}}"),
            partition: (count > 1).then_some(index),
            ..self.clone()
        }
    }

    /// How many partitions the deployment's matching state is split into, as the first
    /// instance recorded it (see [`crate::matching::partitioned`]).
    pub fn partitions(&self) -> String {
        format!("{}:partitions", self.prefix)
    }

    /// The channel of one instance: frames and kicks for the connections it holds.
    pub fn channel(&self, instance: &str) -> String {
        format!("{}{instance}", self.channel_prefix)
    }

    /// The channel every instance of the deployment listens on, besides its own.
    pub fn broadcast(&self) -> &str {
        &self.broadcast
    }

    /// The key that routes a matching call to the deployment's slot in Redis Cluster.
    pub fn route(&self) -> String {
        format!("{}:route", self.prefix)
    }

    /// A ban (its JSON), expiring with it: [`Layout::ban_prefix`] and [`ban_member`].
    pub fn ban(&self, kind: &str, value: &str) -> String {
        format!("{}{}", self.ban_prefix(), ban_member(kind, value))
    }

    /// What every ban key starts with: the moderation library's `list` finds a ban's key as
    /// this prefix followed by the listing's member.
    pub fn ban_prefix(&self) -> String {
        format!("{}:ban:", self.prefix)
    }

    /// The sorted set of `<kind>:<value>` by end time, for listing the bans.
    pub fn bans(&self) -> String {
        format!("{}:bans", self.prefix)
    }

    /// Who reported `user`, by time.
    pub fn reporters(&self, user: &str) -> String {
        format!("{}:reporters:{user}", self.prefix)
    }

    /// The report stream.
    pub fn reports(&self) -> String {
        format!("{}:reports", self.prefix)
    }

    /// The moderators' decisions on reports: report id -> state and time.
    pub fn report_reviews(&self) -> String {
        format!("{}:report_reviews", self.prefix)
    }

    /// How many reports `user` filed in the current hour.
    pub fn filed(&self, user: &str) -> String {
        format!("{}:filed:{user}", self.prefix)
    }

    /// The sessions `user` reported lately, with their stream entries.
    pub fn filed_sessions(&self, user: &str) -> String {
        format!("{}:filed_sessions:{user}", self.prefix)
    }

    /// The outbound webhook events waiting for delivery (a stream read through a consumer
    /// group; see `webhooks::outbox`).
    pub fn webhook_outbox(&self) -> String {
        format!("{}:webhook_outbox", self.prefix)
    }

    /// The dev-mode signing secret the instances share (see `auth`).
    pub fn dev_secret(&self) -> String {
        format!("{}:dev-secret", self.prefix)
    }
}

/// One deployment's Redis: the nodes to reach it at and the layout of its names. What the
/// clients of the shared Redis besides the matching engine (the moderation backend, the
/// shared dev secret) are given, as plain values, in the scale-out mode.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// The node URLs: one, or the seed nodes of a cluster.
    pub urls: Vec<String>,
    /// Whether the nodes form a Redis Cluster.
    pub cluster: bool,
    pub layout: Layout,
}

/// A ban's entry in the listing, and the tail of its key.
pub fn ban_member(kind: &str, value: &str) -> String {
    format!("{kind}:{value}")
}

/// The Redis Cluster slot of a hash tag (or of a key without one): CRC16-XMODEM mod 16384,
/// as Redis computes it (`CLUSTER KEYSLOT`).
pub fn slot(tag: &str) -> u16 {
    let mut crc: u16 = 0;
    for byte in tag.bytes() {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS
}

/// One pub/sub message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice<'a> {
    /// `F<user>\n<seq>\n<frame>`: a frame for a connection of `user` (seq 0 on the wire: none).
    Frame {
        user: &'a str,
        seq: Option<u64>,
        text: &'a str,
    },
    /// `K<user>\n<conn>`: close the connection `conn` of `user`, replaced from elsewhere
    /// (`conn` as [`ConnId`] displays it).
    Kick { user: &'a str, conn: ConnId },
    /// `B<kind>\n<value>`: a ban; every instance closes the connections it names.
    Ban { kind: &'a str, value: &'a str },
}

impl<'a> Notice<'a> {
    pub fn encode(&self) -> String {
        match self {
            Notice::Frame { user, seq, text } => {
                format!("F{user}\n{}\n{text}", seq.unwrap_or(0))
            }
            Notice::Kick { user, conn } => format!("K{user}\n{conn}"),
            Notice::Ban { kind, value } => format!("B{kind}\n{value}"),
        }
    }

    /// One pub/sub message carrying `notices`, in order: a lone notice as [`Notice::encode`]
    /// writes it; several as `M` followed, for each, by its length in bytes in decimal, `\n`
    /// and the notice (so a notice may hold any byte, newlines included). The matching library
    /// sends what one call has for an instance this way, one message instead of one per frame.
    pub fn encode_all(notices: &[Notice<'_>]) -> String {
        match notices {
            [one] => one.encode(),
            _ => {
                let mut message = String::from("M");
                for notice in notices {
                    let text = notice.encode();
                    message.push_str(&format!("{}\n{text}", text.len()));
                }
                message
            }
        }
    }

    /// Reads what [`Notice::encode_all`] (or the Lua library) wrote: every notice of the
    /// message in order; `None` when any part of it is malformed (then none is acted on: the
    /// message did not come from a library that speaks this format).
    pub fn decode_all(payload: &'a [u8]) -> Option<Vec<Notice<'a>>> {
        let Some(mut rest) = payload.strip_prefix(b"M") else {
            return Notice::decode(payload).map(|n| vec![n]);
        };
        let mut notices = Vec::new();
        while !rest.is_empty() {
            let newline = rest.iter().position(|&b| b == b'\n')?;
            let len: usize = std::str::from_utf8(&rest[..newline]).ok()?.parse().ok()?;
            let body = rest.get(newline + 1..)?;
            let notice = body.get(..len)?;
            // Batches are not nested.
            if notice.first() == Some(&b'M') {
                return None;
            }
            notices.push(Notice::decode(notice)?);
            rest = &body[len..];
        }
        // `M` alone carries nothing: no library sends it.
        (!notices.is_empty()).then_some(notices)
    }

    /// Reads what [`Notice::encode`] (or the Lua library) wrote; `None` for anything else.
    pub fn decode(payload: &'a [u8]) -> Option<Notice<'a>> {
        let text = std::str::from_utf8(payload).ok()?;
        let kind = text.get(..1)?;
        let (subject, rest) = text[1..].split_once('\n')?;
        match kind {
            "F" => {
                let (seq, text) = rest.split_once('\n')?;
                let seq = seq.parse::<u64>().ok()?;
                Some(Notice::Frame {
                    user: subject,
                    seq: (seq > 0).then_some(seq),
                    text,
                })
            }
            "K" => Some(Notice::Kick {
                user: subject,
                conn: ConnId::parse(rest)?,
            }),
            "B" => Some(Notice::Ban {
                kind: subject,
                value: rest,
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_round_trip() {
        let notices = [
            Notice::Frame {
                user: "u\u{e9}",
                seq: Some(7),
                text: "{\"type\":\"queued\"}\nwith a newline",
            },
            Notice::Frame {
                user: "u",
                seq: None,
                text: "{}",
            },
            Notice::Kick {
                user: "u",
                conn: ConnId(42),
            },
            Notice::Ban {
                kind: "ip",
                value: "10.0.0.1",
            },
        ];
        for notice in &notices {
            let encoded = notice.encode();
            assert_eq!(Notice::decode(encoded.as_bytes()), Some(notice.clone()));
            // A lone notice travels as it is.
            assert_eq!(Notice::encode_all(std::slice::from_ref(notice)), encoded);
        }
        let message = Notice::encode_all(&notices);
        assert!(message.starts_with('M'), "{message}");
        assert_eq!(
            Notice::decode_all(message.as_bytes()).as_deref(),
            Some(&notices[..])
        );
    }

    #[test]
    fn a_message_of_several_notices_reads_as_documented() {
        // The example of keys.lua's comment, with a real connection id.
        let message = "M12\nFa\n1\n{\"x\":1}20\nKb\nc000000000000002a";
        assert_eq!(
            Notice::decode_all(message.as_bytes()),
            Some(vec![
                Notice::Frame {
                    user: "a",
                    seq: Some(1),
                    text: "{\"x\":1}"
                },
                Notice::Kick {
                    user: "b",
                    conn: ConnId(42)
                },
            ])
        );
    }

    #[test]
    fn a_malformed_message_of_several_notices_is_no_notice() {
        for bad in [
            &b"M"[..],
            b"M12",
            b"M12\nFa\n1\n{}",
            b"Mx\nFa\n1\n{}",
            b"M5\nFa\n1\n{}",
            b"M7\nFa\n1\n{}junk",
            b"M7\nFa\n1\n{}3\nXu\n",
            b"M10\nM5\nFa\n0\n",
            b"M1\n\xff",
        ] {
            assert_eq!(Notice::decode_all(bad), None, "{bad:?}");
        }
        // A lone notice that does not decode either.
        assert_eq!(Notice::decode_all(b"Xu\nv"), None);
    }

    #[test]
    fn garbage_is_no_notice() {
        for bad in [
            &b""[..],
            b"F",
            b"Fu",
            b"Fu\nx\n{}",
            b"Ku\nnot-a-conn",
            b"Xu\nv",
            b"\xff\xfe",
        ] {
            assert_eq!(Notice::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn every_key_carries_the_hash_tag() {
        let layout = Layout::new("mg");
        for key in [
            layout.route(),
            layout.ban("user", "a"),
            layout.bans(),
            layout.reporters("a"),
            layout.reports(),
            layout.filed("a"),
            layout.filed_sessions("a"),
            layout.dev_secret(),
            layout.webhook_outbox(),
            layout.partitions(),
        ] {
            assert!(key.starts_with("{mg}:"), "{key}");
        }
        assert_eq!(layout.channel("i1"), "mg:i:i1");
        assert_eq!(layout.broadcast(), "mg:all");
        // Instances of an older version find the dev secret they share at this key.
        assert_eq!(layout.dev_secret(), "{mg}:dev-secret");
        // The moderation library's `list` reads a ban at prefix .. member.
        assert_eq!(layout.ban("user", "a"), "{mg}:ban:user:a");
        assert_eq!(
            layout.ban("ip", "::1"),
            format!("{}{}", layout.ban_prefix(), ban_member("ip", "::1"))
        );
    }

    #[test]
    fn slots_are_redis_slots() {
        // The reference value of the Redis Cluster specification, and keys whose slots
        // `CLUSTER KEYSLOT` answers (tests/partitions.rs asks a real cluster too).
        assert_eq!(slot("123456789"), 0x31C3);
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot(""), 0);
    }

    #[test]
    fn partitions_spread_over_the_slot_ranges_and_keep_the_channels() {
        let layout = Layout::new("mg");
        let one = layout.partition(0, 1);
        assert_eq!((one.prefix.as_str(), one.partition), ("{mg}", None));
        for count in [2, 3, 4, 6, 7, 64] {
            let mut tags = std::collections::HashSet::new();
            for index in 0..count {
                let p = layout.partition(index, count);
                assert_eq!(p.partition, Some(index));
                assert_eq!(p.channel("i1"), layout.channel("i1"));
                assert_eq!(p.broadcast(), layout.broadcast());
                let tag = &p.prefix[1..p.prefix.len() - 1];
                assert!(
                    tag == "mg" || tag.starts_with(&format!("mg.{index}")),
                    "{tag}"
                );
                // Well inside the index-th range: a quarter of it from either border.
                let (s, range) = (usize::from(slot(tag)), usize::from(SLOTS) / count);
                let start = usize::from(SLOTS) * index / count;
                assert!(
                    s >= start + range / 4 && s < start + range * 3 / 4 + 1,
                    "{tag}: {s}"
                );
                assert!(tags.insert(p.prefix.clone()), "{tag} twice");
            }
        }
    }
}

//! The value parsers every configuration section uses (durations in the unit a flag's name
//! carries, counts, and names that go into Redis keys and room names) and the error of a rule a
//! section checks at start-up. A leaf, so that each
//! section can live next to its module (see [`crate::config`]) without that module depending on
//! the configuration that flattens the sections.

use std::ops::RangeBounds;
use std::time::Duration;

use clap::builder::TypedValueParser;

/// A whole number of milliseconds within `range`, as a [`Duration`] (for flags ending in `_ms`).
pub fn millis(range: impl RangeBounds<u64>) -> impl TypedValueParser<Value = Duration> {
    clap::value_parser!(u64)
        .range(range)
        .map(Duration::from_millis)
}

/// A whole number of seconds within `range`, as a [`Duration`] (for flags ending in `_s` or
/// `_secs`).
pub fn secs(range: impl RangeBounds<u64>) -> impl TypedValueParser<Value = Duration> {
    clap::value_parser!(u64)
        .range(range)
        .map(Duration::from_secs)
}

/// A count (of bytes, connections, entries) within `range`.
pub fn count(range: impl RangeBounds<u64>) -> impl TypedValueParser<Value = usize> {
    clap::value_parser!(u64)
        .range(range)
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
}

/// A name that goes into Redis keys or LiveKit room names: 1 to 32 of `A-Z a-z 0-9 _ -`.
pub fn key_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    ok.then(|| s.to_string())
        .ok_or_else(|| "must be 1 to 32 of A-Z a-z 0-9 _ -".into())
}

/// A configuration that parsed but makes no sense: which flags, and why.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {reason} (flags: --{})", .flags.join(", --"))]
pub struct ConfigError {
    /// The flags the rule relates, as written on the command line without `--`.
    pub flags: Vec<&'static str>,
    pub reason: String,
}

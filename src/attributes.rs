//! What a user's token says about them, as the matching filters read it: the attributes
//! (`--attribute-claims` names the JWT claims they come from, never the client's messages)
//! and the rule that decides whether one user's `want` holds for another's attributes.
//!
//! A leaf: the auth layer makes [`Attributes`] from verified claims, the gateway checks the
//! deployment's requirements against them, and both matching engines store them with a
//! waiting user and apply [`want_holds`] in both directions inside their atomic step (the
//! Redis library mirrors it in Lua).

use std::collections::BTreeMap;

/// A user's attributes: claim name to value, each value as text (`true`, `42`, `de`), so
/// that `want` and `--require-attribute` compare text with text in both engines.
pub type Attributes = BTreeMap<String, String>;

/// The longest attribute name, in characters.
pub const MAX_ATTRIBUTE_NAME_LEN: usize = 32;

/// Whether `name` can be an attribute: 1 to [`MAX_ATTRIBUTE_NAME_LEN`] of `a-z 0-9 _`, in
/// `prefs.want` as in `--attribute-claims` (so every attribute a client can name is one a
/// deployment can configure, and names need no escaping in Redis keys or Lua).
pub fn is_attribute_name(name: &str) -> bool {
    (1..=MAX_ATTRIBUTE_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Constraints on a peer's attributes, as `prefs.want` states them: for each attribute, the
/// values the peer may have.
pub type Want = BTreeMap<String, Vec<String>>;

/// Whether `want` holds for a peer with `attributes`: every constrained attribute is present
/// and has one of the wanted values. A peer without an attribute fails any constraint on it.
pub fn want_holds(want: &Want, attributes: &Attributes) -> bool {
    want.iter().all(|(name, values)| {
        attributes
            .get(name)
            .is_some_and(|value| values.iter().any(|v| v == value))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map<V: Clone>(pairs: &[(&str, V)]) -> BTreeMap<String, V> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn a_want_holds_when_every_constrained_attribute_has_a_wanted_value() {
        let want = map(&[("country", vec!["de".to_string(), "at".to_string()])]);
        assert!(want_holds(&want, &map(&[("country", "at".to_string())])));
        assert!(!want_holds(&want, &map(&[("country", "fr".to_string())])));
        // No attribute: no match, whatever the constraint.
        assert!(!want_holds(&want, &Attributes::new()));
        // No constraint: anybody.
        assert!(want_holds(&Want::new(), &Attributes::new()));
    }
}

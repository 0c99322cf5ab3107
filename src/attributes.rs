//! What a user's token says about them, as the matching filters read it: the attributes
//! (`--attribute-claims` names the JWT claims they come from, never the client's messages)
//! and the rule that decides whether one user's `want` holds for another's attributes.
//!
//! A leaf (it needs only the configuration's leaf `flags`): the auth layer makes
//! [`Attributes`] from verified claims (the claims this module's section, [`AttributeConfig`],
//! names), the gateway checks the deployment's rules ([`AttributePolicy`]: which attributes
//! `want` may name, which ones a user must have) before a user is queued, and both matching
//! engines store them with a waiting user and apply [`want_holds`] in both directions inside
//! their atomic step (the Redis library mirrors it in Lua).

use std::collections::BTreeMap;
use std::fmt;

use crate::flags::ConfigError;

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

/// The longest value `--require-attribute` may require, in characters (as long as a value
/// in `prefs.want`).
const MAX_REQUIRED_VALUE_LEN: usize = 64;

/// The attributes section of the configuration: where attributes come from and what a
/// deployment does with them.
#[derive(Debug, Clone, clap::Args)]
pub struct AttributeConfig {
    /// Comma-separated JWT claims that become the user's attributes (e.g.
    /// `country,gender,age_verified`), each 1 to 32 of `a-z 0-9 _`. A string claim is taken as
    /// it is, a boolean as `true`/`false`, an integer as its decimal text; other types, and
    /// claims the token lacks, leave the attribute absent. Attributes come only from the
    /// token, never from the client's messages.
    #[arg(
        long,
        env = "MATCHGATE_ATTRIBUTE_CLAIMS",
        value_delimiter = ',',
        num_args = 0..,
        value_parser = attribute_name
    )]
    pub attribute_claims: Vec<String>,

    /// Comma-separated attributes that `prefs.want` may constrain, each one of
    /// `--attribute-claims`; a `want` on any other attribute is refused with `bad_request`.
    /// Empty: clients cannot filter by attributes.
    #[arg(
        long,
        env = "MATCHGATE_FILTERABLE_ATTRIBUTES",
        value_delimiter = ',',
        num_args = 0..,
        value_parser = attribute_name
    )]
    pub filterable_attributes: Vec<String>,

    /// `NAME=VALUE`: users whose token does not give attribute NAME (one of
    /// `--attribute-claims`) exactly this value are refused at `enqueue` with
    /// `attribute_required` (e.g. `age_verified=true`). Repeat the flag, or separate with
    /// commas; every requirement must hold.
    #[arg(
        long,
        env = "MATCHGATE_REQUIRE_ATTRIBUTE",
        value_delimiter = ',',
        num_args = 0..,
        value_name = "NAME=VALUE",
        value_parser = requirement
    )]
    pub require_attribute: Vec<Requirement>,
}

/// A `--attribute-claims` or `--filterable-attributes` entry.
fn attribute_name(s: &str) -> Result<String, String> {
    if is_attribute_name(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "attribute names are 1 to {MAX_ATTRIBUTE_NAME_LEN} of a-z 0-9 _"
        ))
    }
}

/// A `--require-attribute` entry: `NAME=VALUE`.
fn requirement(s: &str) -> Result<Requirement, String> {
    let Some((name, value)) = s.split_once('=') else {
        return Err("must be NAME=VALUE, e.g. age_verified=true".into());
    };
    let name = attribute_name(name)?;
    if value.is_empty()
        || value.chars().count() > MAX_REQUIRED_VALUE_LEN
        || value.chars().any(char::is_control)
    {
        return Err(format!(
            "the value after = must be 1 to {MAX_REQUIRED_VALUE_LEN} characters, none of them control characters"
        ));
    }
    Ok(Requirement {
        name,
        value: value.to_string(),
    })
}

/// An attribute a user must have, with this value, to be queued (`--require-attribute`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub name: String,
    pub value: String,
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.value)
    }
}

impl AttributeConfig {
    /// Every attribute that is filtered on or required must be one the tokens give (else no
    /// user could ever have it), and no attribute is required with two values (no user could
    /// have both). Called once at start-up.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let unknown = |name: &str| !self.attribute_claims.iter().any(|c| c == name);
        if let Some(name) = self.filterable_attributes.iter().find(|n| unknown(n)) {
            return Err(ConfigError {
                flags: vec!["filterable-attributes", "attribute-claims"],
                reason: format!(
                    "MATCHGATE_FILTERABLE_ATTRIBUTES names {name}, which is not in MATCHGATE_ATTRIBUTE_CLAIMS: no user would have it"
                ),
            });
        }
        for (i, required) in self.require_attribute.iter().enumerate() {
            if unknown(&required.name) {
                return Err(ConfigError {
                    flags: vec!["require-attribute", "attribute-claims"],
                    reason: format!(
                        "MATCHGATE_REQUIRE_ATTRIBUTE requires {required}, but {} is not in MATCHGATE_ATTRIBUTE_CLAIMS: nobody could be queued",
                        required.name
                    ),
                });
            }
            if let Some(other) = self.require_attribute[..i]
                .iter()
                .find(|r| r.name == required.name && r.value != required.value)
            {
                return Err(ConfigError {
                    flags: vec!["require-attribute"],
                    reason: format!(
                        "MATCHGATE_REQUIRE_ATTRIBUTE requires both {other} and {required}: nobody could be queued"
                    ),
                });
            }
        }
        Ok(())
    }

    /// The rules the gateway applies at `enqueue`.
    pub fn policy(&self) -> AttributePolicy {
        AttributePolicy {
            filterable: self.filterable_attributes.clone(),
            required: self.require_attribute.clone(),
        }
    }
}

/// What a deployment allows and demands of a user's attributes before queueing them: checked
/// by the gateway, so that neither engine needs the configuration.
#[derive(Debug, Clone, Default)]
pub struct AttributePolicy {
    filterable: Vec<String>,
    required: Vec<Requirement>,
}

/// Why the [`AttributePolicy`] refuses an `enqueue`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttributeRefusal {
    /// `prefs.want` names an attribute clients may not filter on here.
    #[error("prefs.want.{attribute}: this gateway does not let clients filter on {attribute} (filterable: {filterable})")]
    NotFilterable {
        attribute: String,
        /// The attributes that are, for the message.
        filterable: String,
    },
    /// The user's token does not give the attribute the required value.
    #[error("this gateway queues only users whose token says {0}")]
    Required(Requirement),
}

impl AttributePolicy {
    /// Whether a user with `attributes` may be queued with `want`: every constrained
    /// attribute is filterable, and every requirement holds.
    pub fn admit(&self, want: &Want, attributes: &Attributes) -> Result<(), AttributeRefusal> {
        if let Some(attribute) = want.keys().find(|a| !self.filterable.contains(a)) {
            return Err(AttributeRefusal::NotFilterable {
                attribute: attribute.clone(),
                filterable: match self.filterable.is_empty() {
                    true => "none".into(),
                    false => self.filterable.join(", "),
                },
            });
        }
        match self
            .required
            .iter()
            .find(|r| attributes.get(&r.name) != Some(&r.value))
        {
            Some(missing) => Err(AttributeRefusal::Required(missing.clone())),
            None => Ok(()),
        }
    }
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

    fn config(args: &[&str]) -> Result<AttributeConfig, String> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            attributes: AttributeConfig,
        }
        let mut all = vec!["matchgate"];
        all.extend_from_slice(args);
        let cli = <Cli as clap::Parser>::try_parse_from(all).map_err(|e| e.to_string())?;
        cli.attributes.validate().map_err(|e| e.to_string())?;
        Ok(cli.attributes)
    }

    #[test]
    fn the_section_parses_lists_and_requirements() {
        let c = config(&[
            "--attribute-claims",
            "country,gender,age_verified",
            "--filterable-attributes",
            "country,gender",
            "--require-attribute",
            "age_verified=true",
            "--require-attribute",
            "country=de,gender=a=b",
        ])
        .unwrap();
        assert_eq!(c.attribute_claims, ["country", "gender", "age_verified"]);
        assert_eq!(c.filterable_attributes, ["country", "gender"]);
        let shown: Vec<String> = c.require_attribute.iter().map(|r| r.to_string()).collect();
        assert_eq!(shown, ["age_verified=true", "country=de", "gender=a=b"]);
        let none = config(&[]).unwrap();
        assert!(none.attribute_claims.is_empty() && none.require_attribute.is_empty());
    }

    #[test]
    fn the_section_refuses_nonsense_naming_the_flag() {
        let refused = |args: &[&str], says: &str| {
            let e = config(args).expect_err("refused");
            assert!(e.contains(says), "{args:?}: {e}");
        };
        refused(&["--attribute-claims", "Country"], "--attribute-claims");
        refused(&["--attribute-claims", "a b"], "a-z 0-9 _");
        refused(
            &["--attribute-claims", &"a".repeat(33)],
            "--attribute-claims",
        );
        refused(
            &["--filterable-attributes", "co-untry"],
            "--filterable-attributes",
        );
        for bad in [
            "age_verified",
            "=true",
            "age_verified=",
            "Age=true",
            "a=\u{7}",
        ] {
            refused(
                &[
                    "--attribute-claims",
                    "age_verified",
                    "--require-attribute",
                    bad,
                ],
                "--require-attribute",
            );
        }
        refused(
            &[
                "--attribute-claims",
                "country",
                "--filterable-attributes",
                "country,gender",
            ],
            "MATCHGATE_FILTERABLE_ATTRIBUTES names gender",
        );
        refused(
            &["--require-attribute", "age_verified=true"],
            "age_verified is not in MATCHGATE_ATTRIBUTE_CLAIMS",
        );
        refused(
            &[
                "--attribute-claims",
                "age",
                "--require-attribute",
                "age=18,age=21",
            ],
            "requires both age=18 and age=21",
        );
    }

    #[test]
    fn the_policy_checks_want_keys_then_requirements() {
        let policy = config(&[
            "--attribute-claims",
            "country,gender,age_verified",
            "--filterable-attributes",
            "country",
            "--require-attribute",
            "age_verified=true",
        ])
        .unwrap()
        .policy();
        let verified = map(&[("age_verified", "true".to_string())]);
        let want = map(&[("country", vec!["de".to_string()])]);
        assert_eq!(policy.admit(&want, &verified), Ok(()));
        assert_eq!(policy.admit(&Want::new(), &verified), Ok(()));
        let gender = map(&[("gender", vec!["f".to_string()])]);
        let e = policy.admit(&gender, &verified).unwrap_err();
        assert!(
            matches!(&e, AttributeRefusal::NotFilterable { attribute, .. } if attribute == "gender")
        );
        assert!(e.to_string().contains("(filterable: country)"), "{e}");
        for attributes in [
            Attributes::new(),
            map(&[("age_verified", "false".to_string())]),
            map(&[("age_verified", "True".to_string())]),
        ] {
            let e = policy.admit(&want, &attributes).unwrap_err();
            assert_eq!(
                e.to_string(),
                "this gateway queues only users whose token says age_verified=true"
            );
        }
        // Without configuration: no filters, no requirements.
        let open = AttributePolicy::default();
        assert!(open
            .admit(&want, &Attributes::new())
            .unwrap_err()
            .to_string()
            .contains("(filterable: none)"));
        assert_eq!(open.admit(&Want::new(), &Attributes::new()), Ok(()));
    }
}

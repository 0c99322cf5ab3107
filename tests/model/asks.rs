//! What generated users ask for and carry (issue 12), shared by the differential test and
//! `tests/interests.rs`: interests drawn from a small tag set, `interests_only`, `want`
//! constraints on two attributes (`country`, `gender`), a `soft` entry naming `want.<attr>`,
//! and each user's attributes (fixed per user for a whole case, as a token would give them).
//!
//! Everything is a small `Copy` code, so that generated operations stay `Copy` and print
//! short; [`Ask::apply`] and [`Traits::attributes`] turn them into what the engines take.
//! The tags are listed out of byte order, so that the order of `matched.common_interests`
//! (sorted) differs from the order users named them in.

#![allow(dead_code)] // each test binary uses a different part

use std::fmt;

use matchgate::attributes::{Attributes, Want};
use matchgate::protocol::{PrefField, Prefs};
use proptest::prelude::*;

/// The tag set, deliberately not in byte order.
pub const TAGS: [&str; 4] = ["music", "chess", "art", "dogs"];

/// The `want` constraints a user may state: index 0 is none.
const WANTS: [&[(&str, &[&str])]; 5] = [
    &[],
    &[("country", &["de", "at"])],
    &[("country", &["fr"])],
    &[("gender", &["f"])],
    &[("country", &["de"]), ("gender", &["m"])],
];

const COUNTRIES: [Option<&str>; 4] = [None, Some("de"), Some("at"), Some("fr")];
const GENDERS: [Option<&str>; 3] = [None, Some("f"), Some("m")];

/// The issue-12 part of one enqueue's preferences.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Ask {
    /// Bit `i` set: interested in `TAGS[i]` (at most three bits).
    pub tags: u8,
    /// `interests_only` (only with tags).
    pub only: bool,
    /// Index into the constraints above.
    pub want: u8,
    /// `soft` also names the first constrained attribute (`want.<attr>`), after the pool's.
    pub soft_want: bool,
}

impl Ask {
    /// Interests in `tags`, nothing else.
    pub fn tags(tags: &[&str]) -> Ask {
        let mut mask = 0;
        for t in tags {
            let i = TAGS.iter().position(|x| x == t).expect("a tag of TAGS");
            mask |= 1 << i;
        }
        Ask {
            tags: mask,
            ..Ask::default()
        }
    }

    /// The interests, in the order of [`TAGS`] (as the protocol layer leaves them: trimmed,
    /// lowercased, no duplicates).
    pub fn interests(self) -> Vec<String> {
        (0..TAGS.len())
            .filter(|i| self.tags & (1 << i) != 0)
            .map(|i| TAGS[i].to_string())
            .collect()
    }

    pub fn want(self) -> Want {
        WANTS[usize::from(self.want)]
            .iter()
            .map(|(name, values)| {
                let values = values.iter().map(|v| v.to_string()).collect();
                (name.to_string(), values)
            })
            .collect()
    }

    /// `prefs` with this ask's interests, `interests_only`, `want` and soft `want.<attr>`.
    pub fn apply(self, mut prefs: Prefs) -> Prefs {
        prefs.interests = self.interests();
        prefs.interests_only = self.only && self.tags != 0;
        prefs.want = self.want();
        if self.soft_want {
            if let Some((name, _)) = WANTS[usize::from(self.want)].first() {
                prefs.soft.push(PrefField::Want(name.to_string()));
            }
        }
        prefs
    }
}

impl fmt::Debug for Ask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.interests())?;
        if self.only && self.tags != 0 {
            write!(f, " only")?;
        }
        for (name, values) in WANTS[usize::from(self.want)] {
            write!(f, " want {name}={}", values.join("|"))?;
        }
        if self.soft_want && self.want != 0 {
            write!(f, " soft")?;
        }
        Ok(())
    }
}

pub fn ask_strategy() -> impl Strategy<Value = Ask> {
    (
        // No interests now and then; otherwise one to three of the four tags.
        prop_oneof![1 => Just(0u8), 4 => 1u8..15],
        proptest::bool::weighted(0.2),
        prop_oneof![3 => Just(0u8), 2 => 1..WANTS.len() as u8],
        proptest::bool::weighted(0.3),
    )
        .prop_map(|(tags, only, want, soft_want)| Ask {
            tags,
            only: only && tags != 0,
            want,
            soft_want: soft_want && want != 0,
        })
}

/// A user's attributes: a country (or none) and a gender (or none).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Traits {
    pub country: u8,
    pub gender: u8,
}

impl Traits {
    pub fn attributes(self) -> Attributes {
        let mut a = Attributes::new();
        if let Some(c) = COUNTRIES[usize::from(self.country)] {
            a.insert("country".into(), c.into());
        }
        if let Some(g) = GENDERS[usize::from(self.gender)] {
            a.insert("gender".into(), g.into());
        }
        a
    }
}

impl fmt::Debug for Traits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.attributes())
    }
}

pub fn traits_strategy() -> impl Strategy<Value = Traits> {
    (0..COUNTRIES.len() as u8, 0..GENDERS.len() as u8)
        .prop_map(|(country, gender)| Traits { country, gender })
}

/// The interests two users share, sorted by bytes (what `matched.common_interests` says).
pub fn common(a: &[String], b: &[String]) -> Vec<String> {
    let mut shared: Vec<String> = a.iter().filter(|t| b.contains(t)).cloned().collect();
    shared.sort();
    shared
}

//! Cohorts: which members of a group a rollout takes, by what their signed status
//! says (target, CPU features, kilnd version, other groups) and by the operator's
//! signed tags ([`crate::fleet::Tags`]). `kiln rollout --where EXPR` gives one
//! [`Condition`] per flag; a member is selected when every condition holds
//! ([`selects`]). The conditions' texts travel in the signed record
//! ([`super::Policy::cohort`]), so every operator sees who was chosen and why.
//!
//! ```text
//! target=aarch64-unknown-linux-gnu   the device's triple (or a kiln target's name:
//! target=rpi4-aarch64                its triple, with all of its CPU features)
//! feature=neon                       the device has this CPU feature
//! kilnd>=0.9.0                       its kilnd version (=, !=, <, <=, >, >=)
//! group=west                         it is also a member of this group
//! tag=canary                         an operator tagged it (`kiln tag`)
//! ```
//!
//! Every attribute but `kilnd` takes `=` or `!=` (`tag!=fragile`).

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::fmt;

use crate::fleet::DeviceFacts;
use crate::names::{check, Kind};
use crate::target::TargetProfile;

/// Conditions one rollout may have.
pub const MAX_CONDITIONS: usize = 16;
/// The longest condition's text (a triple and its attribute with room to spare).
pub const MAX_CONDITION_LEN: usize = 128;

/// What a condition looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attr {
    Target,
    Feature,
    Kilnd,
    Group,
    Tag,
}

impl Attr {
    const ALL: [(Attr, &'static str); 5] = [
        (Attr::Target, "target"),
        (Attr::Feature, "feature"),
        (Attr::Kilnd, "kilnd"),
        (Attr::Group, "group"),
        (Attr::Tag, "tag"),
    ];

    fn word(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(a, _)| *a == self)
            .map_or("", |p| p.1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Op {
    /// Longest first, so `<=` is not read as `<`.
    const ALL: [(Op, &'static str); 6] = [
        (Op::Ne, "!="),
        (Op::Le, "<="),
        (Op::Ge, ">="),
        (Op::Eq, "="),
        (Op::Lt, "<"),
        (Op::Gt, ">"),
    ];

    fn word(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(o, _)| *o == self)
            .map_or("", |p| p.1)
    }

    fn holds(self, ord: Ordering) -> bool {
        match self {
            Op::Eq => ord == Ordering::Equal,
            Op::Ne => ord != Ordering::Equal,
            Op::Lt => ord == Ordering::Less,
            Op::Le => ord != Ordering::Greater,
            Op::Gt => ord == Ordering::Greater,
            Op::Ge => ord != Ordering::Less,
        }
    }
}

/// A kilnd version, `X.Y.Z` with an optional pre-release (`-rc1`), which orders
/// before the release of the same numbers. Build metadata (`+...`) is ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub numbers: (u64, u64, u64),
    /// The pre-release text; `None` (a release) orders after any pre-release.
    pub pre: Option<String>,
}

impl Version {
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("`{text}` is not a version like 0.9.0 (X.Y.Z)");
        let core = text.split('+').next().unwrap_or_default();
        let (core, pre) = match core.split_once('-') {
            // Dot-separated identifiers of [0-9A-Za-z-], none empty (as semver has
            // them): what parses shows as the same text.
            Some((c, p))
                if p.split('.').all(|id| {
                    !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                }) =>
            {
                (c, Some(p.to_string()))
            }
            Some(_) => return Err(bad()),
            None => (core, None),
        };
        let mut parts = core.split('.').map(|n| {
            (!n.is_empty() && n.len() <= 9 && n.bytes().all(|b| b.is_ascii_digit()))
                .then(|| n.parse::<u64>().ok())
                .flatten()
        });
        let (Some(Some(x)), Some(Some(y)), Some(Some(z)), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        Ok(Version {
            numbers: (x, y, z),
            pre,
        })
    }

    fn cmp_release(&self, other: &Self) -> Ordering {
        self.numbers
            .cmp(&other.numbers)
            .then_with(|| match (&self.pre, &other.pre) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(a), Some(b)) => pre_release_order(a, b),
            })
    }
}

/// Semver's order of pre-releases: identifier by identifier, numbers numerically
/// and before words, and a prefix before what extends it (`rc.2` < `rc.10` < `rc.10.1`).
fn pre_release_order(a: &str, b: &str) -> Ordering {
    // Numeric identifiers compare by length, then text (without leading zeros):
    // numerically, without overflow however long.
    fn rank(id: &str) -> (u8, usize, &str) {
        match id.bytes().all(|b| b.is_ascii_digit()) {
            true => (
                0,
                id.trim_start_matches('0').len(),
                id.trim_start_matches('0'),
            ),
            false => (1, 0, id),
        }
    }
    let (mut a, mut b) = (a.split('.'), b.split('.'));
    loop {
        match (a.next(), b.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => match rank(x).cmp(&rank(y)) {
                Ordering::Equal => continue,
                other => return other,
            },
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (x, y, z) = self.numbers;
        write!(f, "{x}.{y}.{z}")?;
        if let Some(p) = &self.pre {
            write!(f, "-{p}")?;
        }
        Ok(())
    }
}

/// One `--where` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub attr: Attr,
    pub op: Op,
    /// The name (checked), or the version's text.
    pub value: String,
    /// The version, for `kilnd`.
    version: Option<Version>,
}

/// What a condition is matched against: a member's signed status and its verified
/// tags (none when it has no tags record, or one that does not verify).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    pub triple: String,
    pub cpu_features: Vec<String>,
    pub kilnd: String,
    pub groups: Vec<String>,
    pub tags: BTreeSet<String>,
}

impl Attributes {
    /// A device's attributes: what its signed status says, and its verified tags.
    pub fn of(facts: &DeviceFacts, tags: BTreeSet<String>) -> Self {
        Attributes {
            triple: facts.triple.clone(),
            cpu_features: facts.cpu_features.clone(),
            kilnd: facts.kilnd.clone(),
            groups: facts.groups.clone(),
            tags,
        }
    }
}

impl Condition {
    /// `ATTR OP VALUE` (spaces around the operator allowed); the error is one line
    /// saying what is wrong, without the flag (the caller names it).
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > MAX_CONDITION_LEN {
            return Err(format!(
                "a condition is at most {MAX_CONDITION_LEN} bytes, not {}",
                text.len()
            ));
        }
        let shown = text.escape_debug().to_string();
        let form = "ATTR=VALUE with ATTR one of target, feature, kilnd, group, tag (kilnd also <, <=, >, >=, !=)";
        let Some((at, op, word)) = text.char_indices().find_map(|(i, _)| {
            Op::ALL
                .iter()
                .find(|(_, w)| text[i..].starts_with(w))
                .map(|(op, w)| (i, *op, *w))
        }) else {
            return Err(format!("`{shown}` is not {form}"));
        };
        let (key, value) = (text[..at].trim(), text[at + word.len()..].trim());
        let Some(attr) = Attr::ALL.iter().find(|(_, w)| *w == key).map(|p| p.0) else {
            return Err(format!(
                "`{}` is not an attribute: use target, feature, kilnd, group or tag (in `{shown}`)",
                key.escape_debug()
            ));
        };
        if value.is_empty() {
            return Err(format!("`{shown}` names no value after `{word}`"));
        }
        if attr != Attr::Kilnd && !matches!(op, Op::Eq | Op::Ne) {
            return Err(format!(
                "`{shown}`: {key} takes = or != (only kilnd compares with <, <=, >, >=)"
            ));
        }
        let version = match attr {
            Attr::Kilnd => Some(Version::parse(value).map_err(|e| format!("`{shown}`: {e}"))?),
            Attr::Group => {
                check(Kind::Group, value).map_err(|e| format!("`{shown}`: {e}"))?;
                None
            }
            Attr::Tag => {
                check(Kind::Tag, value).map_err(|e| format!("`{shown}`: {e}"))?;
                None
            }
            Attr::Target | Attr::Feature => {
                if let Some(c) = value
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+')))
                {
                    return Err(format!("`{shown}`: a {key} has no `{}`", c.escape_debug()));
                }
                None
            }
        };
        Ok(Condition {
            attr,
            op,
            value: version
                .as_ref()
                .map_or(value.to_string(), Version::to_string),
            version,
        })
    }

    /// Whether it holds for a member. `profiles` resolve a `target=` kiln target
    /// name to its triple and CPU features; any other value is a triple. A device
    /// whose kilnd version does not parse is never selected by a `kilnd` condition.
    pub fn holds(&self, device: &Attributes, profiles: &[TargetProfile]) -> bool {
        let is = match self.attr {
            Attr::Target => match profiles.iter().find(|p| p.name == self.value) {
                Some(p) => {
                    p.triple == device.triple
                        && p.cpu_features
                            .iter()
                            .all(|f| device.cpu_features.contains(f))
                }
                None => device.triple == self.value,
            },
            Attr::Feature => device.cpu_features.contains(&self.value),
            Attr::Group => device.groups.contains(&self.value),
            Attr::Tag => device.tags.contains(&self.value),
            Attr::Kilnd => {
                let (Some(want), Ok(have)) = (&self.version, Version::parse(&device.kilnd)) else {
                    return false;
                };
                return self.op.holds(have.cmp_release(want));
            }
        };
        is == (self.op == Op::Eq)
    }
}

/// `tag=canary`, `kilnd>=0.9.0`: the form it parses from, normalized.
impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}{}", self.attr.word(), self.op.word(), self.value)
    }
}

/// Parses every condition; the error names the one at fault.
pub fn parse_all(texts: &[String]) -> Result<Vec<Condition>, String> {
    if texts.len() > MAX_CONDITIONS {
        return Err(format!(
            "{} conditions (at most {MAX_CONDITIONS})",
            texts.len()
        ));
    }
    texts.iter().map(|t| Condition::parse(t)).collect()
}

/// Whether every condition holds for `device` (no condition: every member).
pub fn selects(conditions: &[Condition], device: &Attributes, profiles: &[TargetProfile]) -> bool {
    conditions.iter().all(|c| c.holds(device, profiles))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn device() -> Attributes {
        Attributes {
            triple: "aarch64-unknown-linux-gnu".into(),
            cpu_features: vec!["neon".into(), "crc".into()],
            kilnd: "0.9.2".into(),
            groups: vec!["lab".into(), "west".into()],
            tags: ["canary".to_string()].into(),
        }
    }

    fn profile(name: &str, triple: &str, features: &[&str]) -> TargetProfile {
        TargetProfile {
            name: name.into(),
            triple: triple.into(),
            cpu_features: features.iter().map(|f| f.to_string()).collect(),
            linker: None,
            qemu: Vec::new(),
            description: String::new(),
        }
    }

    fn holds(text: &str) -> bool {
        let profiles = [
            profile("aarch64-linux", "aarch64-unknown-linux-gnu", &["neon"]),
            profile("rpi5", "aarch64-unknown-linux-gnu", &["neon", "lse"]),
        ];
        Condition::parse(text).unwrap().holds(&device(), &profiles)
    }

    #[test]
    fn each_attribute_selects_by_what_the_device_reported_or_was_tagged_with() {
        for yes in [
            "target=aarch64-unknown-linux-gnu",
            "target=aarch64-linux",
            "target!=x86_64-unknown-linux-gnu",
            "target!=rpi5",
            "feature=neon",
            "feature!=avx2",
            "group=west",
            "group!=east",
            "tag=canary",
            "tag!=fragile",
            "kilnd>=0.9.0",
            "kilnd >= 0.9.2",
            "kilnd=0.9.2",
            "kilnd<0.10.0",
            "kilnd<=0.9.2",
            "kilnd>0.9.2-rc1",
            "kilnd!=0.9.1",
        ] {
            assert!(holds(yes), "{yes}");
        }
        for no in [
            "target=x86_64-unknown-linux-gnu",
            "target=rpi5",
            "feature=avx2",
            "group=east",
            "tag=fragile",
            "tag!=canary",
            "kilnd>0.9.2",
            "kilnd<0.9.2",
            "kilnd=0.9.1",
            "kilnd>=1.0.0",
        ] {
            assert!(!holds(no), "{no}");
        }
    }

    #[test]
    fn pre_releases_order_as_semver_has_them_and_show_as_they_parse() {
        let v = |t: &str| Version::parse(t).unwrap();
        let ordered = [
            "0.9.0-alpha",
            "0.9.0-alpha.1",
            "0.9.0-alpha.beta",
            "0.9.0-rc.2",
            "0.9.0-rc.10",
            "0.9.0-rc.10.1",
            "0.9.0",
            "0.9.1-1",
        ];
        for pair in ordered.windows(2) {
            assert_eq!(
                v(pair[0]).cmp_release(&v(pair[1])),
                Ordering::Less,
                "{pair:?}"
            );
        }
        for text in [
            "0.9.0-",
            "0.9.0-rc..1",
            "0.9.0-rc 1",
            "0.9.0-r\u{c}c",
            "0.9.0-rc_1",
        ] {
            assert!(Version::parse(text).is_err(), "{text:?}");
        }
        assert_eq!(v("0.9.0-rc.1+build.5").to_string(), "0.9.0-rc.1");
    }

    #[test]
    fn a_device_whose_version_does_not_parse_is_never_selected_by_it() {
        let mut d = device();
        d.kilnd = "unknown".into();
        for c in ["kilnd>=0.0.0", "kilnd!=9.9.9", "kilnd<99.0.0"] {
            assert!(!Condition::parse(c).unwrap().holds(&d, &[]), "{c}");
        }
    }

    #[test]
    fn pre_releases_order_before_their_release() {
        let v = |t: &str| Version::parse(t).unwrap();
        assert_eq!(v("1.0.0-rc1").cmp_release(&v("1.0.0")), Ordering::Less);
        assert_eq!(v("1.0.0+abc").cmp_release(&v("1.0.0")), Ordering::Equal);
        assert_eq!(v("0.10.0").cmp_release(&v("0.9.9")), Ordering::Greater);
        for bad in [
            "1", "1.0", "1.0.0.0", "a.b.c", "1..0", "-1.0.0", "1.0.0-", "",
        ] {
            assert!(Version::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bad_condition_is_one_line_saying_why() {
        for (bad, why) in [
            ("canary", "is not ATTR=VALUE"),
            ("colour=red", "`colour` is not an attribute"),
            ("tag=", "names no value"),
            ("tag>canary", "tag takes = or !="),
            ("kilnd>=latest", "not a version like 0.9.0"),
            ("tag=a/b", "tag name `a/b` contains `/`"),
            ("group=lab+", "group name"),
            ("target=a b", "a target has no ` `"),
            ("feature=a\u{1b}[31m", "a feature has no"),
        ] {
            let e = Condition::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(!e.contains('\n') && !e.contains('\u{1b}'), "{bad}: {e}");
        }
        let long = format!("tag={}", "x".repeat(MAX_CONDITION_LEN));
        assert!(Condition::parse(&long).unwrap_err().contains("at most"));
        let many = vec!["tag=a".to_string(); MAX_CONDITIONS + 1];
        assert!(parse_all(&many).unwrap_err().contains("at most 16"));
    }

    #[test]
    fn no_condition_selects_every_member_and_several_must_all_hold() {
        assert!(selects(&[], &device(), &[]));
        let both = parse_all(&["tag=canary".into(), "kilnd>=0.9.0".into()]).unwrap();
        assert!(selects(&both, &device(), &[]));
        let one_fails = parse_all(&["tag=canary".into(), "group=east".into()]).unwrap();
        assert!(!selects(&one_fails, &device(), &[]));
    }

    fn attr() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["target", "feature", "group", "tag"])
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-z0-9][a-z0-9._-]{0,20}"
    }

    proptest! {
        /// What a condition prints parses back to the same condition.
        #[test]
        fn a_condition_prints_as_it_parses(
            a in attr(),
            ne in any::<bool>(),
            v in name(),
            ver in (0u64..100, 0u64..100, 0u64..100),
            op in prop::sample::select(vec!["=", "!=", "<", "<=", ">", ">="]),
        ) {
            let text = format!("{a}{}{v}", if ne { "!=" } else { "=" });
            let c = Condition::parse(&text).unwrap();
            prop_assert_eq!(c.to_string(), text.clone());
            prop_assert_eq!(Condition::parse(&c.to_string()).unwrap(), c);
            let text = format!("kilnd{op}{}.{}.{}", ver.0, ver.1, ver.2);
            let c = Condition::parse(&text).unwrap();
            prop_assert_eq!(c.to_string(), text);
        }

        /// `=` and `!=` of the same value never both hold, and one always does.
        #[test]
        fn a_condition_and_its_negation_split_the_fleet(
            a in attr(),
            v in name(),
            tags in prop::collection::btree_set(name(), 0..4),
            groups in prop::collection::vec(name(), 0..4),
            kilnd in (0u64..3, 0u64..3, 0u64..3),
            want in (0u64..3, 0u64..3, 0u64..3),
        ) {
            let d = Attributes {
                triple: v.clone(),
                cpu_features: groups.clone(),
                kilnd: format!("{}.{}.{}", kilnd.0, kilnd.1, kilnd.2),
                groups,
                tags,
            };
            let yes = Condition::parse(&format!("{a}={v}")).unwrap().holds(&d, &[]);
            let no = Condition::parse(&format!("{a}!={v}")).unwrap().holds(&d, &[]);
            prop_assert_ne!(yes, no);
            let w = format!("{}.{}.{}", want.0, want.1, want.2);
            let ge = Condition::parse(&format!("kilnd>={w}")).unwrap().holds(&d, &[]);
            let lt = Condition::parse(&format!("kilnd<{w}")).unwrap().holds(&d, &[]);
            prop_assert_ne!(ge, lt);
            let eq = Condition::parse(&format!("kilnd={w}")).unwrap().holds(&d, &[]);
            prop_assert_eq!(eq, kilnd == want);
        }

        /// Whatever text comes in, parsing gives a condition or a one-line error.
        #[test]
        fn any_text_parses_or_is_refused_on_one_line(text in ".{0,40}") {
            if let Err(e) = Condition::parse(&text) {
                prop_assert!(!e.contains('\n'), "{}", e);
            }
        }
    }
}

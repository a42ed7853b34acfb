//! Host side: host names as the policy sees them. Every name from the guest
//! (DNS question, HTTP Host, TLS SNI) is parsed into a [`HostName`] first:
//! ASCII, lower case, no trailing dot, RFC 1123 labels, and never an IP
//! address in any spelling (`127.1`, `2130706433`, `0x7f.1`,
//! `[::ffff:127.0.0.1]`), so the policy only ever compares validated names.

use std::fmt;

use thiserror::Error;

pub const MAX_NAME: usize = 253;
pub const MAX_LABEL: usize = 63;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    #[error("Empty host name")]
    Empty,
    #[error("Host name is longer than {MAX_NAME} bytes")]
    TooLong,
    #[error("Host name '{0}' is an IP address; only names are allowed")]
    IpLiteral(String),
    #[error("Host name '{0}' is not a valid DNS name")]
    Invalid(String),
}

/// A validated, normalised DNS name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostName(String);

fn printable(raw: &str) -> String {
    raw.chars().take(80).map(|c| if c.is_ascii_graphic() { c } else { '?' }).collect()
}

/// True if a label could be read as a number by some IPv4 parser:
/// decimal, octal (leading 0) or hexadecimal (0x...).
fn numeric_label(label: &str) -> bool {
    let hex = label.strip_prefix("0x").or_else(|| label.strip_prefix("0X"));
    match hex {
        Some(h) => h.chars().all(|c| c.is_ascii_hexdigit()),
        None => !label.is_empty() && label.chars().all(|c| c.is_ascii_digit()),
    }
}

impl HostName {
    /// Parses and normalises a name. Case is folded; one trailing dot
    /// (the fully qualified form) is dropped.
    pub fn parse(raw: &str) -> Result<HostName, Error> {
        if raw.is_empty() {
            return Err(Error::Empty);
        }
        if raw.len() > MAX_NAME + 1 {
            return Err(Error::TooLong);
        }
        if raw.starts_with('[') || raw.contains(':') {
            return Err(Error::IpLiteral(printable(raw)));
        }
        let name = raw.strip_suffix('.').unwrap_or(raw).to_ascii_lowercase();
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(if name.is_empty() { Error::Empty } else { Error::TooLong });
        }
        let labels: Vec<&str> = name.split('.').collect();
        // An all-numeric last label makes it an address for inet_aton and
        // browsers alike (127.1, 2130706433, 0x7f.1, 1.2.3.4).
        if labels.last().is_some_and(|l| numeric_label(l)) {
            return Err(Error::IpLiteral(printable(raw)));
        }
        for label in &labels {
            let ok = !label.is_empty()
                && label.len() <= MAX_LABEL
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !ok {
                return Err(Error::Invalid(printable(raw)));
            }
        }
        Ok(HostName(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True if `self` is `parent` or below it.
    pub fn is_within(&self, parent: &HostName) -> bool {
        self.0 == parent.0 || self.is_strictly_below(parent)
    }

    /// True if `self` is a proper subdomain of `parent` (label boundary:
    /// `evilexample.com` is not below `example.com`).
    pub fn is_strictly_below(&self, parent: &HostName) -> bool {
        self.0.len() > parent.0.len() + 1 && self.0.ends_with(&parent.0) && {
            let cut = self.0.len() - parent.0.len() - 1;
            self.0.as_bytes()[cut] == b'.'
        }
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalised() {
        assert_eq!(HostName::parse("Example.COM.").unwrap().as_str(), "example.com");
        assert_eq!(HostName::parse("a-b.c0.example").unwrap().as_str(), "a-b.c0.example");
        assert_eq!(HostName::parse("xn--bcher-kva.example").unwrap().as_str(), "xn--bcher-kva.example");
        assert_eq!(HostName::parse("localhost").unwrap().as_str(), "localhost");
    }

    #[test]
    fn ip_literals_in_every_spelling_are_refused() {
        for raw in [
            "127.0.0.1",
            "127.1",
            "2130706433",
            "0x7f.1",
            "0x7F000001",
            "017700000001",
            "1.2.3.4.",
            "[::ffff:127.0.0.1]",
            "::1",
            "[::1]",
            "fe80::1%eth0",
        ] {
            assert!(matches!(HostName::parse(raw), Err(Error::IpLiteral(_))), "{raw}");
        }
        // Numbers inside a name are fine; only the last label decides.
        assert!(HostName::parse("1.2.3.example").is_ok());
        assert!(HostName::parse("0x7f.example").is_ok());
    }

    #[test]
    fn malformed_names_are_refused() {
        for raw in [".", "..", "a..b", ".a", "-a.com", "a-.com", "a_b.com", "a b.com", "é.com", "a/b", "a@b.com"] {
            assert!(HostName::parse(raw).is_err(), "{raw}");
        }
        assert_eq!(HostName::parse(""), Err(Error::Empty));
        assert!(HostName::parse(&format!("{}.com", "a".repeat(64))).is_err());
        let long = vec!["a".repeat(60); 5].join(".");
        assert_eq!(HostName::parse(&long), Err(Error::TooLong));
    }

    #[test]
    fn subdomains_respect_label_boundaries() {
        let parent = HostName::parse("example.com").unwrap();
        let h = |s| HostName::parse(s).unwrap();
        assert!(h("a.example.com").is_strictly_below(&parent));
        assert!(h("a.b.example.com").is_strictly_below(&parent));
        assert!(!h("example.com").is_strictly_below(&parent));
        assert!(h("example.com").is_within(&parent));
        assert!(!h("evilexample.com").is_within(&parent));
        assert!(!h("example.com.evil.com").is_within(&parent));
    }
}

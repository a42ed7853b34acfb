//! Host side: the sandbox policy document — one TOML file holding a
//! sandbox's whole policy. This module owns the document and nothing of
//! its meaning: it parses the file once, keeping every value's position,
//! splits it into its sections and hands each (still positioned) to its
//! owner, which checks it — the network part to `netstack::policy`
//! ([`Policy::from_section`]), the `[files]` table to `vmm::fs::policy`.
//! Every error names the file, the line and column of the offending text
//! in it, the section and the problem. No section is written back to
//! text and read again (that made positions point at the wrong text).
//!
//! Version 2 (the current layout): `version` at the top, the network keys
//! in `[network]`, the shared folders in `[files]`.
//!
//! ```toml
//! version = 2
//! [network]                       # network: netstack/src/policy.rs
//! preset = "balanced"
//! [[network.rule]]
//! allow = "api.example.com"
//!
//! [files]                         # the shared folders: vmm/src/fs/policy.rs
//! hidden = ["secrets/", "*.p12"]  # added to the defaults
//! read_only = ["Makefile"]        # added to the defaults
//! ```
//!
//! Version 1 (still read, and read identically): the same network keys
//! at the top level (`preset`, `https`, `approval`, `include`, `[[rule]]`,
//! `[[credential]]`), and the same `[files]`. Each v1 top-level network
//! key `K` is `network.K` in v2 (`[[rule]]` is `[[network.rule]]`);
//! nothing else changes. A `[network]` table in a v1 file, or a network
//! key at the top of a v2 file, is refused with the cure, so that a file
//! half-converted is not read as something else.

use std::ops::Range;
use std::path::{Path, PathBuf};

use netstack::policy::{NetworkSection, Policy, NETWORK_KEYS};
use serde::Deserialize;
use thiserror::Error;
use toml::de::{DeTable, DeValue, Deserializer, ValueDeserializer};
use toml::Spanned;
use vmm::fs::policy::FsPolicy;

/// Largest policy file read.
pub const MAX_POLICY_FILE: u64 = 1 << 20;

/// The layout with network keys at the top level.
pub const VERSION_1: i64 = 1;
/// The layout with the network keys in `[network]`.
pub const VERSION_2: i64 = 2;

/// Where in the file an error is: line and column (1-based, the column
/// in characters), when known. Displays as `, line L, column C`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct At(pub Option<(usize, usize)>);

impl std::fmt::Display for At {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some((line, column)) => write!(f, ", line {line}, column {column}"),
            None => Ok(()),
        }
    }
}

impl At {
    /// The line and column of byte `span.start` of `text`.
    fn of(text: &str, span: Option<Range<usize>>) -> At {
        let Some(span) = span else { return At(None) };
        let start = span.start.min(text.len());
        let before = &text.as_bytes()[..start];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let column = text.get(line_start..start).map_or(start - line_start, |s| s.chars().count()) + 1;
        At(Some((line, column)))
    }
}

#[derive(Debug, Error)]
pub enum Error {
    #[error("Cannot read the policy file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("The policy file {0} is larger than {MAX_POLICY_FILE} bytes")]
    TooLarge(PathBuf),
    #[error("{0}{1}: not a TOML document: {2}")]
    Toml(String, At, String),
    #[error("{0}: no `version` (start the file with `version = 2`)")]
    NoVersion(String),
    #[error(
        "{0}{1}: policy version {2} is not supported (write `version = 2`; version 1 is the old layout, still read)"
    )]
    Version(String, At, String),
    #[error("{0}{1}: a [network] table is the version 2 layout, but the file says version = 1 (write `version = 2`, or put the network keys at the top level)")]
    NetworkInV1(String, At),
    #[error("{0}{1}: `{2}` is a network key, and a version 2 file keeps those in [network] (move it under [network], `[[rule]]` as `[[network.rule]]`; or write `version = 1`)")]
    NetworkKeyAtTop(String, At, String),
    #[error("{0}{1}: unknown key `{2}` (a version 2 file has `version`, [network] and [files] at the top level)")]
    UnknownKey(String, At, String),
    #[error("{0}{1}: network rules: {2}")]
    Network(String, At, String),
    #[error("{0}{1}: [files]: {2}")]
    Files(String, At, String),
}

/// The `[files]` section as written: patterns added to the file policy's
/// defaults (their syntax is `vmm::fs::policy`'s to check).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesSection {
    #[serde(default)]
    pub hidden: Vec<String>,
    #[serde(default)]
    pub read_only: Vec<String>,
}

/// `[files]` as read: each pattern with its position.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilesRead {
    #[serde(default)]
    hidden: Vec<Spanned<String>>,
    #[serde(default)]
    read_only: Vec<Spanned<String>>,
}

/// A sandbox's policy: each section parsed by its owner.
#[derive(Debug, Clone)]
pub struct SandboxPolicy {
    pub network: Policy,
    pub files: FilesSection,
}

impl SandboxPolicy {
    /// No file: the network's `locked` preset and the file defaults.
    pub fn locked() -> Result<SandboxPolicy, Error> {
        let network = Policy::preset("locked")
            .map_err(|e| Error::Network("the locked preset".into(), At(None), e.to_string()))?;
        Ok(SandboxPolicy { network, files: FilesSection::default() })
    }

    /// Reads and checks the document at `path` (every section).
    pub fn read(path: &Path) -> Result<SandboxPolicy, Error> {
        use std::io::Read;
        let file = std::fs::File::open(path).map_err(|e| Error::Read(path.to_path_buf(), e))?;
        let mut text = String::new();
        file.take(MAX_POLICY_FILE + 1).read_to_string(&mut text).map_err(|e| Error::Read(path.to_path_buf(), e))?;
        if text.len() as u64 > MAX_POLICY_FILE {
            return Err(Error::TooLarge(path.to_path_buf()));
        }
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses a document (version 1 or 2) once; `origin` names it in
    /// errors.
    pub fn parse(text: &str, origin: &str) -> Result<SandboxPolicy, Error> {
        let o = || origin.to_string();
        let at = |span: Option<Range<usize>>| At::of(text, span);
        let serde_error = |e: &toml::de::Error| (at(e.span()), e.message().to_string());
        let root = DeTable::parse(text).map_err(|e| {
            let (at, msg) = serde_error(&e);
            Error::Toml(o(), at, msg)
        })?;
        let root_span = root.span();
        let mut root = root.into_inner();
        let Some(version) = root.remove("version") else { return Err(Error::NoVersion(o())) };
        let version_at = at(Some(version.span()));
        let number = match version.get_ref() {
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix()).ok(),
            _ => None,
        };
        let network_error = |e: toml::de::Error| {
            let (at, msg) = serde_error(&e);
            Error::Network(o(), at, msg)
        };
        let files_value = root.remove("files");
        let network = match number {
            Some(VERSION_1) => {
                if let Some((key, _)) = root.get_key_value("network") {
                    return Err(Error::NetworkInV1(o(), at(Some(key.span()))));
                }
                NetworkSection::deserialize(Deserializer::from(Spanned::new(root_span, root))).map_err(network_error)?
            }
            Some(VERSION_2) => {
                let network = root.remove("network");
                if let Some(key) = root.keys().min_by_key(|k| k.span().start) {
                    let name = key.get_ref().to_string();
                    let key_at = at(Some(key.span()));
                    if NETWORK_KEYS.contains(&name.as_str()) {
                        return Err(Error::NetworkKeyAtTop(o(), key_at, name));
                    }
                    return Err(Error::UnknownKey(o(), key_at, name));
                }
                match network {
                    None => NetworkSection::default(),
                    Some(v) => NetworkSection::deserialize(ValueDeserializer::from(v)).map_err(network_error)?,
                }
            }
            _ => {
                let shown = match version.get_ref() {
                    DeValue::Integer(i) => i.as_str().to_string(),
                    other => format!("of type {}", other.type_str()),
                };
                return Err(Error::Version(o(), version_at, shown));
            }
        };
        let network =
            Policy::from_section(network).map_err(|l| Error::Network(o(), at(l.span), l.error.to_string()))?;
        let files = match files_value {
            None => FilesSection::default(),
            Some(v) => Self::files(v, text, origin)?,
        };
        Ok(SandboxPolicy { network, files })
    }

    /// `[files]`, each pattern checked where it is written, then all
    /// together.
    fn files(value: Spanned<DeValue<'_>>, text: &str, origin: &str) -> Result<FilesSection, Error> {
        let span = value.span();
        let read = FilesRead::deserialize(ValueDeserializer::from(value))
            .map_err(|e| Error::Files(origin.into(), At::of(text, e.span()), e.message().to_string()))?;
        let fail = |span: Range<usize>, e: vmm::fs::policy::Error| {
            Error::Files(origin.into(), At::of(text, Some(span)), e.to_string())
        };
        for h in &read.hidden {
            FsPolicy::with(std::slice::from_ref(h.get_ref()), &[]).map_err(|e| fail(h.span(), e))?;
        }
        for r in &read.read_only {
            FsPolicy::with(&[], std::slice::from_ref(r.get_ref())).map_err(|e| fail(r.span(), e))?;
        }
        let files = FilesSection {
            hidden: read.hidden.into_iter().map(Spanned::into_inner).collect(),
            read_only: read.read_only.into_iter().map(Spanned::into_inner).collect(),
        };
        let whole = SandboxPolicy {
            network: Policy::preset("locked").map_err(|e| Error::Files(origin.into(), At(None), e.to_string()))?,
            files,
        };
        whole.fs_policy(&[], &[]).map_err(|e| fail(span, e))?;
        Ok(whole.files)
    }

    /// The shared folders' policy: the defaults, the `[files]` patterns,
    /// and `also_hidden` (the boot files inside a share).
    pub fn fs_policy(
        &self,
        also_hidden: &[String],
        also_read_only: &[String],
    ) -> Result<FsPolicy, vmm::fs::policy::Error> {
        let hidden = [self.files.hidden.as_slice(), also_hidden].concat();
        let read_only = [self.files.read_only.as_slice(), also_read_only].concat();
        FsPolicy::with(&hidden, &read_only)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use vmm::fs::policy::Access;

    #[test]
    fn each_section_goes_to_its_owner() {
        let doc = "version = 1\npreset = \"locked\"\n[[rule]]\nallow = \"api.example.com\"\n[files]\nhidden = [\"secrets/\"]\nread_only = [\"Makefile\"]\n";
        let p = SandboxPolicy::parse(doc, "p.toml").unwrap();
        assert_eq!(p.files.hidden, vec!["secrets/".to_string()]);
        let fs = p.fs_policy(&["target/sbx/**".into()], &[]).unwrap();
        assert_eq!(fs.access(Path::new("secrets/x"), false), Access::Hidden);
        assert_eq!(fs.access(Path::new("Makefile"), false), Access::ReadOnly);
        assert_eq!(fs.access(Path::new("target/sbx/vmlinux"), false), Access::Hidden);
        let host = netstack::host::HostName::parse("api.example.com").unwrap();
        let req = netstack::policy::Request { host: &host, port: 443, http: None };
        assert_eq!(p.network.decide(&req).action, netstack::policy::Action::Allow, "the rule reached netstack");
        assert!(SandboxPolicy::locked().is_ok());
        let none = SandboxPolicy::parse("version = 1\n", "p.toml").unwrap();
        assert_eq!(none.files, FilesSection::default());
    }

    #[test]
    fn errors_name_the_file_and_the_section() {
        let e = SandboxPolicy::parse("version = 1\n[files]\nhiden = []\n", "my.toml").unwrap_err();
        assert!(
            matches!(e, Error::Files(..)) && e.to_string().starts_with("my.toml, line 3, column 1: [files]"),
            "{e}"
        );
        let e = SandboxPolicy::parse("version = 1\n[files]\nhidden = [\"/abs\"]\n", "my.toml").unwrap_err();
        assert!(e.to_string().contains("relative to the shared folder"), "{e}");
        let e = SandboxPolicy::parse("version = 9\n", "my.toml").unwrap_err();
        assert!(matches!(e, Error::Version(..)) && e.to_string().starts_with("my.toml, line 1, column 11"), "{e}");
        let e = SandboxPolicy::parse("version = ", "my.toml").unwrap_err();
        assert!(matches!(e, Error::Toml(..)), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; (MAX_POLICY_FILE + 10) as usize]).unwrap();
        assert!(matches!(SandboxPolicy::read(&big), Err(Error::TooLarge(_))));
        assert!(matches!(SandboxPolicy::read(&dir.path().join("none")), Err(Error::Read(..))));
    }

    /// A policy with comments and a `[files]` table before the rules: the
    /// lines of the original file, which re-serialising shifted.
    const DEEP: &str = "version = 1\n# the agent's hosts\npreset = \"balanced\"\n\n[files]\nhidden = [\"secrets/\"]\n\n[[rule]]\nallow = \"a.example.com\"\n\n[[rule]]\nallow = \"b.example.com\"\n";

    #[test]
    fn an_error_deep_in_the_file_names_its_line_and_column() {
        let unknown = format!("{DEEP}  alow = \"c.example.com\"\n");
        let e = SandboxPolicy::parse(&unknown, "my.toml").unwrap_err().to_string();
        assert!(e.contains("line 13, column 3") && e.contains("alow"), "{e}");
        let bad = DEEP.replace("allow = \"b.example.com\"", "allow = \"b example com\"");
        let e = SandboxPolicy::parse(&bad, "my.toml").unwrap_err().to_string();
        assert!(e.contains("line 11, column 1") && e.contains("Rule 2"), "{e}");
        let wrong_type = format!("{DEEP}ports = [\"443\"]\n");
        let e = SandboxPolicy::parse(&wrong_type, "my.toml").unwrap_err().to_string();
        assert!(e.contains("line 13, column 10"), "{e}");
        let files = DEEP.replace("hidden = [\"secrets/\"]", "hidden = [\"secrets/\", \"/abs\"]");
        let e = SandboxPolicy::parse(&files, "my.toml").unwrap_err().to_string();
        assert!(e.contains("line 6, column 23") && e.contains("[files]"), "{e}");
        let syntax = format!("{DEEP}deny = \n");
        let e = SandboxPolicy::parse(&syntax, "my.toml").unwrap_err().to_string();
        assert!(e.contains("line 13, column 8"), "{e}");
    }

    /// One policy in both layouts, every network key used.
    const V1: &str = "version = 1\npreset = \"balanced\"\nhttps = \"passthrough\"\napproval = \"ask\"\ninclude = [\"ask:github\"]\n[[rule]]\nallow = \"api.example.com\"\nmethods = [\"GET\"]\n[[rule]]\nask = \"upload.example.com\"\n[[credential]]\nname = \"corp\"\nhosts = [\"api.example.com\"]\nheader = \"x-token\"\n[files]\nhidden = [\"secrets/\"]\nread_only = [\"Makefile\"]\n";
    const V2: &str = "version = 2\n[network]\npreset = \"balanced\"\nhttps = \"passthrough\"\napproval = \"ask\"\ninclude = [\"ask:github\"]\n[[network.rule]]\nallow = \"api.example.com\"\nmethods = [\"GET\"]\n[[network.rule]]\nask = \"upload.example.com\"\n[[network.credential]]\nname = \"corp\"\nhosts = [\"api.example.com\"]\nheader = \"x-token\"\n[files]\nhidden = [\"secrets/\"]\nread_only = [\"Makefile\"]\n";

    #[test]
    fn version_1_and_version_2_of_one_policy_are_equal() {
        let one = SandboxPolicy::parse(V1, "v1.toml").unwrap();
        let two = SandboxPolicy::parse(V2, "v2.toml").unwrap();
        assert_eq!(one.network, two.network);
        assert_eq!(one.files, two.files);
        assert_eq!(
            one.network,
            Policy::from_toml(&V1[..V1.find("[files]").unwrap()]).unwrap(),
            "v1 as netstack reads it"
        );
        assert!(one.network.credentials.iter().any(|c| c.name == "corp") && !one.network.asks.is_empty());
        let empty = SandboxPolicy::parse("version = 2\n", "v2.toml").unwrap();
        assert_eq!(empty.network, SandboxPolicy::locked().unwrap().network);
        let inline = SandboxPolicy::parse("version = 2\nnetwork = { preset = \"balanced\" }\n", "v2.toml").unwrap();
        assert_eq!(inline.network, Policy::preset("balanced").unwrap());
    }

    #[test]
    fn unknown_versions_are_refused() {
        for (doc, at) in [
            ("version = 3\n", "line 1, column 11"),
            ("version = 0\n", ""),
            ("version = \"2\"\n", ""),
            ("\nversion = -1\n", "line 2, column 11"),
        ] {
            let e = SandboxPolicy::parse(doc, "my.toml").unwrap_err();
            assert!(matches!(e, Error::Version(..)), "{doc}: {e}");
            assert!(e.to_string().contains(at) && e.to_string().contains("version = 2"), "{e}");
        }
        let e = SandboxPolicy::parse("[files]\n", "my.toml").unwrap_err();
        assert!(matches!(e, Error::NoVersion(_)) && e.to_string().contains("version = 2"), "{e}");
    }

    #[test]
    fn the_layouts_are_not_mixed() {
        let e = SandboxPolicy::parse("version = 1\n[network]\npreset = \"open\"\n", "my.toml").unwrap_err();
        assert!(matches!(e, Error::NetworkInV1(..)), "{e}");
        assert!(e.to_string().contains("line 2, column 2") && e.to_string().contains("write `version = 2`"), "{e}");
        let e = SandboxPolicy::parse("version = 2\npreset = \"open\"\n", "my.toml").unwrap_err();
        assert!(matches!(e, Error::NetworkKeyAtTop(..)), "{e}");
        assert!(e.to_string().contains("line 2, column 1") && e.to_string().contains("move it under [network]"), "{e}");
        let e = SandboxPolicy::parse("version = 2\n[files]\n[[rule]]\nallow = \"a.com\"\n", "my.toml").unwrap_err();
        assert!(e.to_string().contains("`rule`") && e.to_string().contains("[[network.rule]]"), "{e}");
        let e = SandboxPolicy::parse("version = 2\nfiles = {}\nhosts = []\n", "my.toml").unwrap_err();
        assert!(matches!(e, Error::UnknownKey(..)) && e.to_string().contains("line 3"), "{e}");
        let e = SandboxPolicy::parse("version = 2\n[network]\nversion = 2\n", "my.toml").unwrap_err();
        assert!(matches!(e, Error::Network(..)) && e.to_string().contains("line 3"), "{e}");
    }
}

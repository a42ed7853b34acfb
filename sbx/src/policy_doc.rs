//! Host side: the sandbox policy document — one TOML file holding a
//! sandbox's whole policy. This module owns the document and nothing of
//! its meaning: it splits it into its sections and hands each to its
//! owner, which parses and checks it — the network rules to
//! `netstack::policy`, the `[files]` table to `vmm::fs::policy`. Errors
//! name the file and the section.
//!
//! ```toml
//! version = 1
//! preset = "balanced"             # network: netstack/src/policy.rs
//! [[rule]]
//! allow = "api.example.com"
//!
//! [files]                         # the shared folders: vmm/src/fs/policy.rs
//! hidden = ["secrets/", "*.p12"]  # added to the defaults
//! read_only = ["Makefile"]        # added to the defaults
//! ```

use std::path::{Path, PathBuf};

use netstack::policy::Policy;
use serde::Deserialize;
use thiserror::Error;
use vmm::fs::policy::FsPolicy;

/// Largest policy file read.
pub const MAX_POLICY_FILE: u64 = 1 << 20;

#[derive(Debug, Error)]
pub enum Error {
    #[error("Cannot read the policy file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("The policy file {0} is larger than {MAX_POLICY_FILE} bytes")]
    TooLarge(PathBuf),
    #[error("{0}: not a TOML document: {1}")]
    Toml(String, String),
    #[error("{0}: network rules: {1}")]
    Network(String, netstack::policy::Error),
    #[error("{0}: [files]: {1}")]
    Files(String, String),
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

/// A sandbox's policy: each section parsed by its owner.
#[derive(Debug, Clone)]
pub struct SandboxPolicy {
    pub network: Policy,
    pub files: FilesSection,
}

impl SandboxPolicy {
    /// No file: the network's `locked` preset and the file defaults.
    pub fn locked() -> Result<SandboxPolicy, Error> {
        let network = Policy::preset("locked").map_err(|e| Error::Network("the locked preset".into(), e))?;
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

    /// Parses a document; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<SandboxPolicy, Error> {
        let mut doc: toml::Table =
            text.parse().map_err(|e: toml::de::Error| Error::Toml(origin.into(), e.to_string()))?;
        let files = match doc.remove("files") {
            None => FilesSection::default(),
            Some(v) => v.try_into().map_err(|e: toml::de::Error| Error::Files(origin.into(), e.to_string()))?,
        };
        let rest = toml::to_string(&doc).map_err(|e| Error::Toml(origin.into(), e.to_string()))?;
        let network = Policy::from_toml(&rest).map_err(|e| Error::Network(origin.into(), e))?;
        let policy = SandboxPolicy { network, files };
        policy.fs_policy(&[], &[]).map_err(|e| Error::Files(origin.into(), e.to_string()))?;
        Ok(policy)
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
        assert!(matches!(e, Error::Files(..)) && e.to_string().starts_with("my.toml: [files]"), "{e}");
        let e = SandboxPolicy::parse("version = 1\n[files]\nhidden = [\"/abs\"]\n", "my.toml").unwrap_err();
        assert!(e.to_string().contains("relative to the shared folder"), "{e}");
        let e = SandboxPolicy::parse("version = 9\n", "my.toml").unwrap_err();
        assert!(matches!(e, Error::Network(..)) && e.to_string().starts_with("my.toml: network rules"), "{e}");
        let e = SandboxPolicy::parse("version = ", "my.toml").unwrap_err();
        assert!(matches!(e, Error::Toml(..)), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; (MAX_POLICY_FILE + 10) as usize]).unwrap();
        assert!(matches!(SandboxPolicy::read(&big), Err(Error::TooLarge(_))));
        assert!(matches!(SandboxPolicy::read(&dir.path().join("none")), Err(Error::Read(..))));
    }
}

//! Host side: the filesystem policy of a shared folder — which paths the
//! guest cannot see at all (hidden) and which it may read but not change
//! (read-only). Pure functions of a path relative to the share's root, as
//! the file server tracks it; the guest's names are validated before they
//! get here (see `share`).
//!
//! # Patterns
//!
//! - A pattern without `/` (`.env`, `*.pem`, `.env.*`) matches a single
//!   name at any depth; a directory it matches is covered with all that is
//!   below it.
//! - A pattern ending in `/` (`.ssh/`) matches a directory of that name at
//!   any depth, with all that is below it.
//! - A pattern with `/` inside (`.git/config`, `.git/hooks/**`) is anchored
//!   at the share's root; `**` stands for any number of names (none too).
//! - In a name, `*` matches any run of characters and `?` one character.
//!
//! - Names are compared folded ([`fold`]): ASCII case, and the few
//!   other characters case folding or NFD turn into ASCII letters.
//! - [`FsPolicy::add_read_only_path`] adds one literal path (no pattern
//!   characters), for paths named at run time.
//!
//! Hidden beats read-only; everything else is read-write.
//!
//! # Case and Unicode
//!
//! Every rule — hidden, read-only, git directory names, git's writable
//! lists, the names of git configs read without their secrets, bare
//! repository detection (in `share`) — matches names folded, always, not
//! only where the folder's filesystem folds case: macOS (APFS, HFS+),
//! NTFS through WSL, vfat and ext4 `casefold` directories (set per
//! directory, so no probe of the folder's root could tell) take `.ENV`
//! for `.env` and `.GIT/CONFIG` for `.git/config`. What always folding
//! costs: on a case-sensitive filesystem `.Env` and `ID_RSA` are hidden
//! too, and `.git/Index` is as writable as `.git/index` (harmless: git
//! there ignores it). Unicode normalization (macOS stores or compares
//! NFD) changes no ASCII name, and no sequence of other characters
//! normalizes to ASCII only except the Kelvin sign (`K`), which [`fold`]
//! maps, and two punctuation marks (`;`, `` ` ``) no pattern names; so a
//! name matches a pattern in one normalization exactly when it does in
//! the other. Names that are not UTF-8 are hidden.
//!
//! # What the host runs on its own
//!
//! The guest must not be able to write anything the user's own tools run,
//! or read as configuration, without the user asking: on a `cd` (direnv,
//! a prompt's git), an editor opening the folder, or `git commit`.
//! Decided per tool:
//!
//! - git: its directory (below); hook managers' hooks and configs:
//!   husky's `.husky/` (the hooks git runs are in `.husky/_/`, through
//!   `core.hooksPath`), `.githooks/`, pre-commit's
//!   `.pre-commit-config.yaml|yml` and `.pre-commit-hooks.yaml`,
//!   lefthook's `lefthook.*`, `.lefthook.*`, `lefthook-local.*`,
//!   `.lefthook-local.*`, its default script directories `.lefthook/`
//!   and `.lefthook-local/`, and `.config/` (where lefthook, mise and
//!   others also look; in a home folder, every tool's config); a shared
//!   `.gitconfig` a repository's config may include. And, found at share
//!   set-up in the host's own files (`autorun`): what the repository's
//!   config, the user's global config and the files they include name in
//!   `core.hooksPath`, `include.path`, `includeIf.*.path`,
//!   `init.templateDir`, command values (`core.fsmonitor`, filters,
//!   drivers, helpers, `hook.*.command`, `!` aliases) and other path
//!   keys; lefthook's configured `source_dir`.
//! - direnv: `.envrc` and `.direnv/`, and what each `.envrc` in or above
//!   the folder names, parsed at set-up (`autorun`): `PATH_add`
//!   directories (the guest would write `DIR/git`), sourced files,
//!   dotenv files, watched files, `layout` directories
//!   (`node_modules/.bin` for `layout node`, `vendor/bin` for `php`,
//!   `.venv`), `use nix|flake|devenv|guix` files, and exported `PATH`,
//!   `LD_*`, `GIT_*`, `EDITOR`-like variables. A word with a variable
//!   sbx cannot know is reported (`Share::notes`), and what it names
//!   stays writable. `.env` and `.env.*` are hidden.
//! - mise (`mise.toml`, `.mise.toml`, `mise.*.toml`, `.mise/`, `mise/`),
//!   yarn (`.yarnrc*`), pnpm (`.pnpmfile.cjs`), editors (`.vscode/`,
//!   `.idea/`), other version control (`.hg/`, `.jj/`).
//! - Not protected, as data a trusted tool reads, not code: asdf's
//!   `.tool-versions` (asdf runs its installed plugins, not the file),
//!   `.nvmrc`, `.node-version`, `.python-version`, `.gitattributes`
//!   (it selects filters; their commands are in the config).
//! - Yours to review, as the project's code: `Makefile`, `package.json`
//!   scripts, `Cargo.toml` build scripts, test suites — and what a hook
//!   runs (`npx lint-staged`, `cargo test`, a pre-commit `repo: local`
//!   entry): a protected hook that runs project code runs what the guest
//!   wrote. `git commit --no-verify` skips hooks.
//!
//! # Git directories
//!
//! The user's own git, and the shell prompt that runs it on `cd`, read a
//! repository's configuration and hooks from its git directory and run
//! what they name (`core.fsmonitor`, filters, hooks, `include.path`). So
//! inside any directory named `.git`, at any depth, the guest may write
//! only what git itself writes while it commits, fetches, merges or
//! rebases ([`GIT_WRITABLE_DIRS`], [`GIT_WRITABLE_FILES`]); everything else
//! there (`config`, `config.worktree`, `commondir`, `hooks/`, `info/`,
//! `modules/`, `worktrees/`, `objects/info/alternates`, ...) is read-only,
//! and a `.git` directory can be neither moved nor replaced. New git
//! directories the guest makes are the share's business (see
//! `share::Share::with_git_shadow`), not this policy's.

use std::path::{Component, Path};

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    #[error("Bad file pattern '{0}': {1}")]
    Pattern(String, &'static str),
}

/// What the guest may do with a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Not listed, not openable, not creatable: as if it did not exist.
    Hidden,
    ReadOnly,
    ReadWrite,
}

/// Secrets a coding agent has no business reading: environment files,
/// private keys and certificates with keys, cloud and cluster
/// credentials, registry tokens, Terraform state (which holds secrets in
/// the clear).
pub const DEFAULT_HIDDEN: &[&str] = &[
    ".env",
    ".env.*",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.jks",
    "*.keystore",
    "id_rsa",
    "id_dsa",
    "id_ecdsa",
    "id_ed25519",
    "id_ecdsa_sk",
    "id_ed25519_sk",
    ".ssh/",
    ".aws/",
    ".azure/",
    ".gnupg/",
    ".docker/",
    ".kube/",
    ".netrc",
    ".git-credentials",
    ".npmrc",
    ".pypirc",
    ".pgpass",
    ".vault-token",
    "credentials*.json",
    "*.tfstate",
    "*.tfstate.*",
];

/// Files the user's own tools run, or take commands from, on the host
/// without being asked: an agent that could change them could plant code
/// the user later runs outside the sandbox — direnv's `.envrc`, editors'
/// workspace settings (which name programs to run), other version
/// control systems' repositories (Mercurial hooks, Jujutsu config),
/// package managers' and tool managers' per-project hooks. (Git's own
/// files are covered at any depth by the git rules.)
pub const DEFAULT_READ_ONLY: &[&str] = &[
    // direnv: the file, and its layouts' directory (`layout python` puts
    // a virtualenv there and its `bin/` on PATH).
    ".envrc",
    ".direnv/",
    // Editors' workspace settings.
    ".vscode/",
    ".idea/",
    // Other version control systems' repositories.
    ".hg/",
    ".jj/",
    // A project's shared git config (`include.path = ../.gitconfig`).
    ".gitconfig",
    // Hook managers: husky (`core.hooksPath = .husky/_`), a plain hooks
    // directory, pre-commit, lefthook (its configs, and the scripts of
    // its default `source_dir` and `source_dir_local`).
    ".husky/",
    ".githooks/",
    ".pre-commit-config.yaml",
    ".pre-commit-config.yml",
    ".pre-commit-hooks.yaml",
    "lefthook.yml",
    "lefthook.yaml",
    "lefthook.json",
    "lefthook.jsonc",
    "lefthook.toml",
    ".lefthook.yml",
    ".lefthook.yaml",
    ".lefthook.json",
    ".lefthook.jsonc",
    ".lefthook.toml",
    "lefthook-local.*",
    ".lefthook-local.*",
    ".lefthook/",
    ".lefthook-local/",
    // Tools' per-project configuration directory (lefthook, mise and
    // others read `.config/NAME*`); a home folder's is all of its tools'.
    ".config/",
    // Package managers' and tool managers' per-project hooks.
    ".yarnrc",
    ".yarnrc.yml",
    ".pnpmfile.cjs",
    ".mise.toml",
    "mise.toml",
    "mise.*.toml",
    ".mise.*.toml",
    ".mise/",
    "mise/",
];

/// Directories inside a git directory that git writes during ordinary
/// work, with all that is below them (the object store, refs and their
/// logs, recorded resolutions, git-lfs's object store). Nothing in them
/// names a command. These directories themselves stay where they are.
pub const GIT_WRITABLE_DIRS: &[&str] = &["objects", "refs", "logs", "rr-cache", "lfs"];

/// The state of a rebase, merge sequence or cherry-pick in progress: its
/// todo list can hold `exec` lines that the user's `git rebase --continue`
/// would run. The guest's own are kept in the shadow (the host's git never
/// sees them); the host's are read-only.
pub const GIT_SHADOWED: &[&str] = &["rebase-merge", "rebase-apply", "sequencer"];

/// Files directly in a git directory that git writes during ordinary work
/// (its lock files included: git writes `X.lock`, then renames it onto
/// `X`). None of them is configuration: git reads them as refs, the
/// index, messages or state.
pub const GIT_WRITABLE_FILES: &[&str] = &[
    "index",
    "HEAD",
    "ORIG_HEAD",
    "FETCH_HEAD",
    "MERGE_HEAD",
    "MERGE_MSG",
    "MERGE_MODE",
    "MERGE_RR",
    "MERGE_AUTOSTASH",
    "AUTO_MERGE",
    "CHERRY_PICK_HEAD",
    "REVERT_HEAD",
    "REBASE_HEAD",
    "BISECT_*",
    "COMMIT_EDITMSG",
    "TAG_EDITMSG",
    "SQUASH_MSG",
    "packed-refs",
    "shallow",
    "gc.pid",
    "gc.log",
];

/// Inside the writable directories, files that make git read objects
/// from elsewhere: the user's git would follow them to any host path.
const GIT_OBJECT_REDIRECTS: &[&str] = &["info/alternates", "info/http-alternates"];

/// What the guest may do at `rest`, the path below a git directory (empty:
/// the git directory itself, which stays writable so that git can create
/// its lock files in it).
fn git_internal(rest: &[&str]) -> Access {
    let Some((first, below)) = rest.split_first() else { return Access::ReadWrite };
    if is_one_of(first, GIT_WRITABLE_DIRS) {
        let redirect = same_name(first, "objects")
            && GIT_OBJECT_REDIRECTS.iter().any(|r| {
                let parts: Vec<&str> = r.split('/').collect();
                parts.len() == below.len() && parts.iter().zip(below).all(|(a, b)| same_name(a, b))
            });
        return if redirect { Access::ReadOnly } else { Access::ReadWrite };
    }
    let folded = fold(first);
    let name = folded.strip_suffix(".lock").unwrap_or(&folded);
    if below.is_empty() && GIT_WRITABLE_FILES.iter().any(|f| glob(fold(f).as_bytes(), name.as_bytes())) {
        Access::ReadWrite
    } else {
        Access::ReadOnly
    }
}

/// The name git gives its directory.
pub const GIT_DIR: &str = ".git";

/// True if `rel` is a configuration file of a git directory (the
/// repository's own, a worktree's or a submodule's): the guest reads it
/// with its secrets taken out (see `gitconfig`).
pub fn is_git_config(rel: &Path) -> bool {
    let names: Vec<&str> = rel.iter().filter_map(|n| n.to_str()).collect();
    below_git(&names).is_some_and(is_git_config_in)
}

/// Like [`is_git_config`], for `rest`, the path below a git directory.
/// Names compare folded (see [`fold`]).
pub fn is_git_config_in(rest: &[&str]) -> bool {
    let folded: Vec<String> = rest.iter().map(|n| fold(n).into_owned()).collect();
    let names: Vec<&str> = folded.iter().map(String::as_str).collect();
    match names.as_slice() {
        ["config" | "config.worktree"] | ["worktrees", _, "config.worktree"] => true,
        ["modules", middle @ .., "config"] => !middle.is_empty(),
        _ => false,
    }
}

/// True if `name` is git's directory name in any spelling a case-folding
/// filesystem would take for it.
pub fn is_git_dir_name(name: &str) -> bool {
    same_name(name, GIT_DIR)
}

/// A name as a case-folding filesystem compares it: ASCII letters in
/// lower case, and the few other characters that Unicode's case folding
/// (and NFD, for the Kelvin sign) turns into ASCII letters (`K` Kelvin
/// sign, `ſ` long s, `ß`/`ẞ`, the Latin ligatures `ﬀ` `ﬁ` `ﬂ` `ﬃ` `ﬄ`
/// `ﬅ` `ﬆ`) replaced by those letters. Every other character stays: no
/// sequence of them folds or normalizes to ASCII only, so no such name
/// can stand for an ASCII one on any filesystem (a pattern's own
/// non-ASCII characters are compared as they are written).
pub fn fold(name: &str) -> std::borrow::Cow<'_, str> {
    if name.bytes().all(|b| b.is_ascii() && !b.is_ascii_uppercase()) {
        return std::borrow::Cow::Borrowed(name);
    }
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '\u{212A}' => out.push('k'),
            '\u{017F}' => out.push('s'),
            '\u{00DF}' | '\u{1E9E}' => out.push_str("ss"),
            '\u{FB00}' => out.push_str("ff"),
            '\u{FB01}' => out.push_str("fi"),
            '\u{FB02}' => out.push_str("fl"),
            '\u{FB03}' => out.push_str("ffi"),
            '\u{FB04}' => out.push_str("ffl"),
            '\u{FB05}' | '\u{FB06}' => out.push_str("st"),
            c => out.push(c.to_ascii_lowercase()),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// True if a case-folding filesystem would take `a` and `b` for one name.
pub fn same_name(a: &str, b: &str) -> bool {
    fold(a) == fold(b)
}

/// True if `name` is, folded, one of `names`.
pub fn is_one_of(name: &str, names: &[&str]) -> bool {
    names.iter().any(|n| same_name(name, n))
}

/// The components below the innermost `.git` of `names`, if there is one
/// (the rules of the repository nearest to the path apply).
fn below_git<'a, 'b>(names: &'a [&'b str]) -> Option<&'a [&'b str]> {
    names.iter().rposition(|n| is_git_dir_name(n)).map(|i| &names[i + 1..])
}

/// Patterns hold their text folded (see [`fold`]), and are matched
/// against folded names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// Matches one name at any depth (and what is below it).
    Name(String),
    /// Matches a directory name at any depth (and what is below it).
    Dir(String),
    /// Anchored at the root, component by component; "**" spans any
    /// number of components.
    Anchored(Vec<String>),
    /// One path from the root, its names taken literally (no `*`, `?` or
    /// `**`): what is there and below it.
    Exact(Vec<String>),
}

/// Longest path an exact rule may name (as Linux's PATH_MAX).
const MAX_EXACT_PATH: usize = 4096;

/// `*` and `?` matching without recursion: on a mismatch, go back to the
/// last `*` and let it take one more character. O(pattern x name) at
/// worst, whatever the guest names a file.
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Anchored components against path names; true if the pattern matches
/// the path or one of its ancestors (what is below a match is covered).
fn anchored(pattern: &[String], names: &[&str]) -> bool {
    match pattern.first().map(String::as_str) {
        None => true,
        Some("**") => (0..=names.len()).any(|skip| anchored(&pattern[1..], &names[skip..])),
        Some(p) => {
            names.first().is_some_and(|n| glob(p.as_bytes(), n.as_bytes()) && anchored(&pattern[1..], &names[1..]))
        }
    }
}

/// Could an anchored pattern match `names` or something below it?
fn anchored_at_or_below(pattern: &[String], names: &[&str]) -> bool {
    match (pattern.first().map(String::as_str), names.first()) {
        (None, _) | (Some("**"), _) | (Some(_), None) => true,
        (Some(p), Some(n)) => glob(p.as_bytes(), n.as_bytes()) && anchored_at_or_below(&pattern[1..], &names[1..]),
    }
}

/// True if one of the two (literal) paths is a prefix of the other: the
/// exact path is at, below or above `names`.
fn on_one_line(exact: &[String], names: &[&str]) -> bool {
    exact.iter().zip(names).all(|(a, b)| a == b)
}

impl Pattern {
    fn parse(raw: &str) -> Result<Pattern, Error> {
        let bad = |why| Error::Pattern(raw.to_string(), why);
        if raw.is_empty() || raw.len() > 256 {
            return Err(bad("empty or too long"));
        }
        if raw.starts_with('/') {
            return Err(bad("patterns are relative to the shared folder; drop the leading '/'"));
        }
        let raw = &*fold(raw);
        if let Some(dir) = raw.strip_suffix('/') {
            if dir.contains('/') || dir.is_empty() {
                return Err(bad("a directory pattern is one name followed by '/'"));
            }
            return Ok(Pattern::Dir(dir.to_string()));
        }
        if !raw.contains('/') {
            return Ok(Pattern::Name(raw.to_string()));
        }
        let parts: Vec<String> = raw.split('/').map(str::to_string).collect();
        if parts.iter().any(|p| p.is_empty() || p == "." || p == "..") {
            return Err(bad("empty, '.' or '..' component"));
        }
        Ok(Pattern::Anchored(parts))
    }

    /// A literal path from the root (see [`Pattern::Exact`]).
    fn exact(rel: &Path) -> Result<Pattern, Error> {
        let bad = |why| Error::Pattern(rel.display().to_string(), why);
        let mut parts = Vec::new();
        for c in rel.components() {
            match c {
                Component::Normal(n) => match n.to_str() {
                    Some(s) => parts.push(fold(s).into_owned()),
                    None => return Err(bad("not UTF-8")),
                },
                Component::CurDir => {}
                _ => return Err(bad("a path inside the shared folder, relative to it, without '..'")),
            }
        }
        if parts.is_empty() || rel.as_os_str().len() > MAX_EXACT_PATH {
            return Err(bad("empty (the folder itself) or too long"));
        }
        Ok(Pattern::Exact(parts))
    }

    /// `names`: the path's components from the root, folded; `is_dir`:
    /// the last one is a directory.
    fn matches(&self, names: &[&str], is_dir: bool) -> bool {
        match self {
            Pattern::Exact(parts) => parts.len() <= names.len() && on_one_line(parts, names),
            Pattern::Name(p) => names.iter().any(|n| glob(p.as_bytes(), n.as_bytes())),
            Pattern::Dir(p) => {
                let dirs = if is_dir { names.len() } else { names.len().saturating_sub(1) };
                names[..dirs].iter().any(|n| glob(p.as_bytes(), n.as_bytes()))
            }
            Pattern::Anchored(parts) => anchored(parts, names),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsPolicy {
    hidden: Vec<Pattern>,
    read_only: Vec<Pattern>,
}

impl Default for FsPolicy {
    fn default() -> Self {
        let parse = |list: &[&str]| list.iter().filter_map(|p| Pattern::parse(p).ok()).collect();
        FsPolicy { hidden: parse(DEFAULT_HIDDEN), read_only: parse(DEFAULT_READ_ONLY) }
    }
}

impl FsPolicy {
    /// The defaults plus these patterns.
    pub fn with(hidden: &[String], read_only: &[String]) -> Result<FsPolicy, Error> {
        let mut p = FsPolicy::default();
        for h in hidden {
            p.hidden.push(Pattern::parse(h)?);
        }
        for r in read_only {
            p.read_only.push(Pattern::parse(r)?);
        }
        Ok(p)
    }

    /// Makes `rel` (a path from the share's root, taken literally: no
    /// pattern characters) read-only, with all that is below it; the
    /// directories above it can then be neither moved nor removed (see
    /// [`FsPolicy::protects_below`]), so it cannot be replaced by moving a
    /// directory there either. For paths named at run time: a file sbx
    /// reads, a hooks directory a host config names.
    pub fn add_read_only_path(&mut self, rel: &Path) -> Result<(), Error> {
        let p = Pattern::exact(rel)?;
        if !self.read_only.contains(&p) {
            self.read_only.push(p);
        }
        Ok(())
    }

    /// True if moving the directory `rel` (to or from there) would change
    /// what a root-anchored pattern protects: `.git` holds `.git/config`,
    /// so `.git` may be neither renamed away nor made by a rename.
    /// A git directory, or a directory in it that git does not write,
    /// holds read-only paths too.
    pub fn protects_below(&self, rel: &Path) -> bool {
        let folded: Vec<String> = rel.iter().filter_map(|n| n.to_str()).map(|n| fold(n).into_owned()).collect();
        let names: Vec<&str> = folded.iter().map(String::as_str).collect();
        let in_git = below_git(&names).is_some_and(|rest| rest.is_empty() || git_internal(rest) == Access::ReadOnly);
        in_git
            || self.hidden.iter().chain(&self.read_only).any(|p| match p {
                Pattern::Anchored(parts) => anchored_at_or_below(parts, &names),
                Pattern::Exact(parts) => on_one_line(parts, &names),
                _ => false,
            })
    }

    /// What the guest may do with `rel` (relative to the share's root; the
    /// root itself is the empty path). Anything but plain names (`..`, a
    /// root, a prefix) is hidden: such a path never comes from the share.
    pub fn access(&self, rel: &Path, is_dir: bool) -> Access {
        let names: Vec<&str> = rel.iter().filter_map(|n| n.to_str()).collect();
        let git_root = names.iter().rposition(|n| is_git_dir_name(n)).map(|i| i + 1);
        self.access_at(rel, is_dir, git_root)
    }

    /// Like [`FsPolicy::access`], with the git directory known: the first
    /// `git_root` components of `rel` are a git directory (a `.git`, or a
    /// bare repository the share found by its contents), so git's rules
    /// apply below them.
    pub fn access_at(&self, rel: &Path, is_dir: bool, git_root: Option<usize>) -> Access {
        let mut folded = Vec::new();
        for c in rel.components() {
            match c {
                Component::Normal(n) => match n.to_str() {
                    Some(s) => folded.push(fold(s)),
                    None => return Access::Hidden,
                },
                Component::CurDir => {}
                _ => return Access::Hidden,
            }
        }
        let names: Vec<&str> = folded.iter().map(|n| &**n).collect();
        if self.hidden.iter().any(|p| p.matches(&names, is_dir)) {
            Access::Hidden
        } else if self.read_only.iter().any(|p| p.matches(&names, is_dir)) {
            Access::ReadOnly
        } else if let Some(rest) = git_root.and_then(|n| names.get(n..)) {
            // A `.git` file names the git directory the host's git uses.
            if rest.is_empty() && !is_dir {
                Access::ReadOnly
            } else {
                git_internal(rest)
            }
        } else {
            Access::ReadWrite
        }
    }

    /// Like [`FsPolicy::access`] for a path in a git directory the guest
    /// made itself, kept where the host's git never looks (see
    /// `share::Share::with_git_shadow`): only hidden patterns apply.
    pub fn access_in_shadow(&self, rel: &Path, is_dir: bool) -> Access {
        match self.access(rel, is_dir) {
            Access::Hidden => Access::Hidden,
            _ => Access::ReadWrite,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(p: &FsPolicy, path: &str, is_dir: bool) -> Access {
        p.access(Path::new(path), is_dir)
    }

    #[test]
    fn default_secrets_are_hidden_at_any_depth() {
        let p = FsPolicy::default();
        for path in [".env", ".env.local", "app/.env", "certs/server.pem", "a/b/c.key", ".netrc", ".npmrc"] {
            assert_eq!(access(&p, path, false), Access::Hidden, "{path}");
        }
        for path in [".ssh", "home/.ssh", ".aws"] {
            assert_eq!(access(&p, path, true), Access::Hidden, "{path}");
        }
        assert_eq!(access(&p, ".ssh/id_ed25519", false), Access::Hidden, "below a hidden directory");
        assert_eq!(access(&p, "x/.aws/credentials", false), Access::Hidden);
        for path in ["src/main.rs", "environment.md", "keys.rs", "my.env", "pem", ".envelope"] {
            assert_eq!(access(&p, path, false), Access::ReadWrite, "{path}");
        }
        // A file named like a directory pattern is not a directory.
        assert_eq!(access(&p, "docs/.ssh", false), Access::ReadWrite);
        assert_eq!(access(&p, "", true), Access::ReadWrite, "the root itself");
    }

    #[test]
    fn in_git_directories_only_what_git_writes_is_writable() {
        let p = FsPolicy::default();
        for (path, dir) in [
            (".git/hooks", true),
            (".git/hooks/pre-commit", false),
            (".git/hooks/a/b", false),
            (".git/config", false),
            (".git/config.lock", false),
            (".git/config.worktree", false),
            (".git/commondir", false),
            (".git/worktrees/w/config.worktree", false),
            (".git/worktrees/w/commondir", false),
            (".git/modules/sub/config", false),
            (".git/modules/sub/hooks/post-checkout", false),
            (".git/info/attributes", false),
            (".git/info", true),
            (".git/objects/info/alternates", false),
            (".git/objects/info/http-alternates", false),
            (".git/description", false),
            (".git/rebase-merge/git-rebase-todo", false),
            (".git/sequencer/todo", false),
            (".git/objects/x/.git/config", false),
            ("sub/.git/config", false),
            ("a/b/.git/hooks/pre-commit", false),
            (".envrc", false),
        ] {
            assert_eq!(access(&p, path, dir), Access::ReadOnly, "{path}");
        }
        for path in [
            ".git/HEAD",
            ".git/HEAD.lock",
            ".git/index",
            ".git/index.lock",
            ".git/ORIG_HEAD",
            ".git/COMMIT_EDITMSG",
            ".git/BISECT_LOG",
            ".git/packed-refs.lock",
            ".git/objects/ab/cdef",
            ".git/objects/pack/pack-1.pack",
            ".git/objects/info/commit-graph",
            ".git/refs/heads/main.lock",
            ".git/logs/refs/heads/main",
            "sub/.git/refs/heads/x",
            ".gitconfig-notes",
            "git/config",
            "hooks/x",
        ] {
            assert_eq!(access(&p, path, false), Access::ReadWrite, "{path}");
        }
        assert_eq!(access(&p, ".git", true), Access::ReadWrite, "git makes its lock files in it");
        assert_eq!(access(&p, "sub/.git", false), Access::ReadOnly, "a .git file names a git directory");
        assert_eq!(p.access_in_shadow(Path::new(".git/config"), false), Access::ReadWrite);
        for (path, yes) in
            [(".git/config", true), ("a/.git/modules/m/config", true), ("config", false), (".git/configs", false)]
        {
            assert_eq!(is_git_config(Path::new(path)), yes, "{path}");
        }
        assert_eq!(p.access_in_shadow(Path::new(".git/.env"), false), Access::Hidden);
    }

    #[test]
    fn tools_that_run_project_settings_cannot_be_given_new_ones() {
        let p = FsPolicy::default();
        for path in [".vscode/settings.json", ".hg/hgrc", "sub/.jj/repo/config.toml", ".yarnrc.yml", "mise.toml"] {
            assert_eq!(access(&p, path, false), Access::ReadOnly, "{path}");
        }
        assert_eq!(access(&p, "src/vscode.rs", false), Access::ReadWrite);
    }

    #[test]
    fn more_secrets_are_hidden_by_default() {
        let p = FsPolicy::default();
        for path in [
            "id_rsa",
            "home/me/id_ed25519",
            "cert.p12",
            "a.pfx",
            ".docker/config.json",
            ".kube/config",
            "infra/terraform.tfstate",
            "infra/terraform.tfstate.backup",
            "credentials.json",
            "credentials-prod.json",
            ".pgpass",
        ] {
            assert_eq!(access(&p, path, false), Access::Hidden, "{path}");
        }
        for path in ["id_rsa.pub", "credentials.md", "docker/compose.yml"] {
            assert_eq!(access(&p, path, false), Access::ReadWrite, "{path}");
        }
    }

    #[test]
    fn hidden_beats_read_only_and_extra_patterns_apply() {
        let p =
            FsPolicy::with(&["secrets/".into(), ".git/config".into()], &["vendor/**".into(), "*.lock".into()]).unwrap();
        assert_eq!(access(&p, ".git/config", false), Access::Hidden);
        assert_eq!(access(&p, "secrets/db.txt", false), Access::Hidden);
        assert_eq!(access(&p, "vendor/x/y.c", false), Access::ReadOnly);
        assert_eq!(access(&p, "vendor", true), Access::ReadOnly);
        assert_eq!(access(&p, "Cargo.lock", false), Access::ReadOnly);
    }

    #[test]
    fn directories_holding_anchored_paths_are_known() {
        let p = FsPolicy::default();
        assert!(p.protects_below(Path::new(".git")));
        assert!(p.protects_below(Path::new(".git/hooks")));
        assert!(!p.protects_below(Path::new("src")));
        assert!(p.protects_below(Path::new("sub/.git")), "any git directory");
        assert!(p.protects_below(Path::new("sub/.git/modules/x")));
        assert!(!p.protects_below(Path::new(".git/refs/heads")), "git's own directories may move");
        assert!(!p.protects_below(Path::new("sub")));
    }

    #[test]
    fn hook_managers_and_their_scripts_are_read_only() {
        let p = FsPolicy::default();
        for (path, dir) in [
            (".husky", true),
            (".husky/pre-commit", false),
            (".husky/_/pre-commit", false),
            (".husky/_/husky.sh", false),
            ("web/.husky/pre-push", false),
            (".githooks/pre-commit", false),
            (".pre-commit-config.yaml", false),
            (".pre-commit-config.yml", false),
            (".pre-commit-hooks.yaml", false),
            ("lefthook.yml", false),
            ("lefthook.toml", false),
            (".lefthook.json", false),
            ("lefthook-local.yml", false),
            (".lefthook-local.yaml", false),
            (".lefthook/pre-commit/lint.sh", false),
            (".lefthook-local/pre-push/x", false),
            (".config/lefthook.yml", false),
            (".config/mise/config.toml", false),
            (".direnv/python-3.12/bin/python", false),
            (".gitconfig", false),
            ("mise.dev.toml", false),
        ] {
            assert_eq!(access(&p, path, dir), Access::ReadOnly, "{path}");
        }
        for path in ["src/lefthook.rs", "husky.md", "hooks/pre-commit", "pre-commit-config.yaml", "config/app.yml"] {
            assert_eq!(access(&p, path, false), Access::ReadWrite, "{path}");
        }
    }

    #[test]
    fn every_rule_matches_in_any_case() {
        let p = FsPolicy::with(&["Secrets/".into()], &["Vendor/**".into()]).unwrap();
        for path in
            [".ENV", ".Env.Local", "ID_ED25519", "Id_Rsa", "CERT.PEM", ".SSH/id_rsa", "secrets/x", ".\u{17F}sh/x"]
        {
            assert_eq!(access(&p, path, false), Access::Hidden, "{path}");
        }
        for path in [
            ".ENVRC",
            ".HUSKY/pre-commit",
            ".Vscode/settings.json",
            ".GIT/CONFIG",
            ".Git/Hooks/pre-commit",
            ".git/Config",
            ".git/objects/INFO/ALTERNATES",
            ".git/OBJECTS/info/alternates",
            "vendor/x.c",
            "LEFTHOOK.YML",
        ] {
            assert_eq!(access(&p, path, false), Access::ReadOnly, "{path}");
        }
        // What git writes stays writable in any case (on a case-folding
        // filesystem it is the same file).
        for path in [".GIT/HEAD", ".git/Index.LOCK", ".Git/Objects/ab/cd", ".git/REFS/heads/main"] {
            assert_eq!(access(&p, path, false), Access::ReadWrite, "{path}");
        }
        for path in [".GIT/CONFIG", ".git/Config.Worktree", ".git/MODULES/m/CONFIG"] {
            assert!(is_git_config(Path::new(path)), "{path}: read without its secrets");
        }
        assert!(p.protects_below(Path::new(".GIT")) && p.protects_below(Path::new(".git/HOOKS")));
        assert!(!p.protects_below(Path::new(".git/REFS")), "git's own directories may move");
        // The Kelvin sign is `K` after NFD, and `k` folded.
        assert_eq!(access(&p, "a.\u{212A}ey", false), Access::Hidden);
        assert_eq!(fold("A\u{FB06}\u{DF}"), "astss");
        assert_eq!(fold("caf\u{E9}"), "caf\u{E9}", "other characters stay");
    }

    #[test]
    fn exact_read_only_paths_and_what_holds_them() {
        let mut p = FsPolicy::default();
        p.add_read_only_path(Path::new("conf/sbx/policy*.toml")).unwrap();
        assert_eq!(access(&p, "conf/sbx/policy*.toml", false), Access::ReadOnly);
        assert_eq!(access(&p, "CONF/Sbx/POLICY*.toml", false), Access::ReadOnly);
        assert_eq!(access(&p, "conf/sbx/policy-x.toml", false), Access::ReadWrite, "taken literally");
        assert_eq!(access(&p, "conf/sbx", true), Access::ReadWrite);
        for dir in ["conf", "conf/sbx", "Conf"] {
            assert!(p.protects_below(Path::new(dir)), "{dir}");
        }
        assert!(!p.protects_below(Path::new("conf/other")) && !p.protects_below(Path::new("src")));
        p.add_read_only_path(Path::new("tools/hooks")).unwrap();
        assert_eq!(access(&p, "tools/hooks/pre-commit", false), Access::ReadOnly, "below it too");
        for bad in ["", ".", "../x", "/abs", "a/../b"] {
            assert!(p.add_read_only_path(Path::new(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths_that_are_not_plain_names_are_hidden() {
        let p = FsPolicy::default();
        for path in ["../etc/passwd", "/etc/passwd", "a/../../b"] {
            assert_eq!(access(&p, path, false), Access::Hidden, "{path}");
        }
    }

    #[test]
    fn bad_patterns_are_refused_with_a_reason() {
        for bad in ["", "/abs", "a//b", "a/../b", "x/y/", "/"] {
            assert!(FsPolicy::with(&[bad.into()], &[]).is_err(), "{bad}");
        }
        let e = FsPolicy::with(&["/etc".into()], &[]).unwrap_err();
        assert!(e.to_string().contains("relative to the shared folder"));
    }

    #[test]
    fn globs() {
        assert!(glob(b"*.pem", b"a.pem") && glob(b"*.pem", b".pem") && !glob(b"*.pem", b"a.pem.txt"));
        assert!(glob(b".env.*", b".env.prod") && !glob(b".env.*", b".env"));
        assert!(glob(b"?x", b"ax") && !glob(b"?x", b"x"));
        assert!(glob(b"**", b"anything") && glob(b"a*b*c", b"aXbYc") && !glob(b"a*b*c", b"aXbY"));
        assert!(glob(b"", b"") && !glob(b"", b"a") && glob(b"*", b""));
        // A hostile name against a star-heavy pattern stays quick.
        let name = [b"a".repeat(250), b"b".to_vec()].concat();
        let started = std::time::Instant::now();
        assert!(!glob(b"*a*a*a*a*a*a*a*a*a*a*c", &name));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }
}

//! Host side, at share set-up: the paths of a shared folder that the
//! host's own tools, as the host's own files configure them, run or load
//! without being asked — so that the share makes them read-only. Read
//! from the host's files directly (never through the guest's view), each
//! bounded in size, and before the guest runs.
//!
//! - Git: the config of the repository holding the folder (found by
//!   walking up from it, as git does), of every repository the folder has
//!   (to [`MAX_TREE_ENTRIES`] entries deep), the user's global config
//!   (`$GIT_CONFIG_GLOBAL`, `~/.gitconfig`, `$XDG_CONFIG_HOME/git/config`)
//!   and `/etc/gitconfig`, and every file they include (`include.path`,
//!   `includeIf.*.path`: every condition taken as true, relative paths
//!   from the including file's directory, to [`MAX_INCLUDE_DEPTH`]). What
//!   is taken: the value of [`GIT_PATH_KEYS`] (`core.hooksPath`, relative
//!   to the work tree, `include.path`, `init.templateDir`,
//!   `gpg.ssh.allowedSignersFile`, `http.sslCAInfo`, `*.path`, ...), and
//!   every word holding a `/` of a command [`GIT_COMMAND_KEYS`] name
//!   (`core.fsmonitor`, `core.editor`, filters, diff and merge drivers,
//!   credential helpers, `hook.*.command`, `!` aliases), relative to the
//!   work tree. A bare word is found on `PATH`, not in the folder.
//! - direnv: every `.envrc` in the folder (to the same bound) and above
//!   it, and what they source, parsed with a plain tokenizer (quotes,
//!   `;`, `&&`, `||`, comments): `PATH_add`, `path_add PATH|LD_*`,
//!   `load_prefix` (directories), `source_env[_if_exists]`, `source`,
//!   `.`, `source_up[_if_exists]`, `dotenv[_if_exists]`, `watch_file`,
//!   `watch_dir` (files), `layout` ([`LAYOUT_DIRS`]), `use` ([`USE_FILES`]),
//!   and `export VAR=...` of the variables in [`EXEC_VARS`] (`PATH`,
//!   `LD_PRELOAD`, `GIT_*`, `EDITOR`, `XDG_CONFIG_HOME`, ...). `$PWD`,
//!   `${PWD}`, `$(pwd)`, `$HOME`, `~` and `direnv_layout_dir` are
//!   expanded; a word with any other `$` or a backquote cannot be known
//!   here: it is reported as a note (and what it names stays writable);
//!   `$PATH` in `PATH=` is the PATH before, skipped.
//! - lefthook: `source_dir` and `source_dir_local` set in a lefthook
//!   config at a work tree's root.
//!
//! A target that is the folder itself (`PATH_add .`, `core.hooksPath =
//! .`) makes the whole folder read-only ([`Found::whole_folder`]): its
//! top-level names are what would run.

use std::collections::{BTreeSet, VecDeque};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use super::gitconfig::MAX_CONFIG;
use super::policy::{same_name, GIT_DIR};

/// Largest `.envrc` (or file it sources) read; a larger one is noted and
/// skipped.
pub const MAX_SCRIPT: usize = 256 << 10;
/// Deepest chain of git includes followed (git's own limit).
pub const MAX_INCLUDE_DEPTH: usize = 10;
/// Most config and script files read in all.
pub const MAX_FILES: usize = 256;
/// Most folder entries looked at for `.envrc` files and repositories.
pub const MAX_TREE_ENTRIES: usize = 20_000;
/// Deepest directory looked into for them.
pub const MAX_TREE_DEPTH: usize = 8;
/// Most paths taken; past it the whole folder is read-only.
pub const MAX_PATHS: usize = 4096;
/// Most notes kept.
const MAX_NOTES: usize = 64;
/// Most ancestors of the folder looked at for a repository or `.envrc`.
const MAX_ANCESTORS: usize = 64;

/// Git config keys (the last part, folded) whose whole value is a path.
pub const GIT_PATH_KEYS: &[&str] = &[
    "path",
    "hookspath",
    "templatedir",
    "allowedsignersfile",
    "sslcainfo",
    "sslcapath",
    "sslcert",
    "sslkey",
    "attributesfile",
];

/// Git config keys (the last part, folded) whose value is a command.
pub const GIT_COMMAND_KEYS: &[&str] = &[
    "fsmonitor",
    "editor",
    "pager",
    "sshcommand",
    "askpass",
    "program",
    "external",
    "command",
    "cmd",
    "textconv",
    "clean",
    "smudge",
    "process",
    "driver",
    "helper",
    "uploadpack",
    "receivepack",
    "packobjectshook",
    "gitproxy",
    "browser",
    "tool",
];

/// Sections all of whose values are commands (`pager.log = cmd`; an
/// alias only when it starts with `!`, else it is git's own arguments).
const GIT_COMMAND_SECTIONS: &[&str] = &["pager"];

/// Sections whose `path` is not a program or config (a submodule's is
/// its checkout).
const GIT_PATH_DATA_SECTIONS: &[&str] = &["submodule"];

/// Environment variables a `.envrc` may export that make the user's shell
/// or tools run, load or take config from a path.
pub const EXEC_VARS: &[&str] = &[
    "PATH",
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "BASH_ENV",
    "ENV",
    "ZDOTDIR",
    "PROMPT_COMMAND",
    "XDG_CONFIG_HOME",
    "DIRENV_CONFIG",
    "GIT_EXEC_PATH",
    "GIT_TEMPLATE_DIR",
    "GIT_CONFIG",
    "GIT_CONFIG_GLOBAL",
    "GIT_CONFIG_SYSTEM",
    "GIT_SSH",
    "GIT_SSH_COMMAND",
    "GIT_EDITOR",
    "GIT_SEQUENCE_EDITOR",
    "GIT_PAGER",
    "GIT_ASKPASS",
    "SSH_ASKPASS",
    "EDITOR",
    "VISUAL",
    "PAGER",
    "NODE_OPTIONS",
    "PYTHONSTARTUP",
    "RUSTC_WRAPPER",
    "CARGO_HOME",
    "RUSTUP_HOME",
    "NPM_CONFIG_USERCONFIG",
];

/// Directories (from the `.envrc`'s) that `layout NAME` puts on PATH.
pub const LAYOUT_DIRS: &[(&str, &[&str])] = &[
    ("node", &["node_modules/.bin"]),
    ("php", &["vendor/bin"]),
    ("go", &["bin", ".direnv"]),
    ("python", &[".direnv", ".venv"]),
    ("python3", &[".direnv", ".venv"]),
    ("poetry", &[".venv"]),
    ("pipenv", &[".venv"]),
    ("uv", &[".venv"]),
    ("pdm", &[".venv"]),
    ("ruby", &[".direnv"]),
    ("perl", &[".direnv"]),
    ("julia", &[".direnv"]),
    ("pyenv", &[".direnv"]),
];

/// Files (from the `.envrc`'s) that `use NAME` evaluates.
pub const USE_FILES: &[(&str, &[&str])] = &[
    ("nix", &["shell.nix", "default.nix"]),
    ("flake", &["flake.nix", "flake.lock"]),
    ("devenv", &["devenv.nix", "devenv.yaml", "devenv.lock", ".devenv"]),
    ("guix", &["manifest.scm", "guix.scm"]),
];

/// `use` and `layout` names that name nothing in the folder.
const NAMES_NOTHING: &[&str] = &["node", "nvm", "asdf", "mise", "rbenv", "vim", "anaconda"];

/// What the host's tools would run or load from the folder.
#[derive(Debug, Default)]
pub struct Found {
    /// Paths from the folder's root (not the root itself).
    pub paths: BTreeSet<PathBuf>,
    /// A target is the folder itself, or too many were found.
    pub whole_folder: bool,
    /// What could not be resolved or read (for the user).
    pub notes: Vec<String>,
}

struct Scan {
    /// The folder as given and as resolved.
    roots: Vec<PathBuf>,
    home: Option<PathBuf>,
    found: Found,
    files_read: usize,
    configs_seen: BTreeSet<PathBuf>,
    scripts_seen: BTreeSet<PathBuf>,
}

/// Scans for `folder` (an absolute path).
pub fn scan(folder: &Path) -> Found {
    let mut roots = vec![lexical(folder)];
    if let Ok(c) = std::fs::canonicalize(folder) {
        if !roots.contains(&c) {
            roots.push(c);
        }
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).filter(|h| h.is_absolute());
    let mut s = Scan {
        roots,
        home,
        found: Found::default(),
        files_read: 0,
        configs_seen: BTreeSet::new(),
        scripts_seen: BTreeSet::new(),
    };
    let root = s.roots[0].clone();
    // What is above the folder: the repository holding it, `.envrc`s.
    let mut above = root.parent().map(Path::to_path_buf);
    let mut repo_found = false;
    for _ in 0..MAX_ANCESTORS {
        let Some(dir) = above else { break };
        if !repo_found && dir.join(GIT_DIR).exists() {
            repo_found = true;
            s.repository(&dir);
        }
        if dir.join(".envrc").is_file() {
            s.envrc(&dir.join(".envrc"), 0);
        }
        above = dir.parent().map(Path::to_path_buf);
    }
    // What is in it.
    let (repos, envrcs) = s.tree(&root);
    for w in repos {
        s.repository(&w);
    }
    for e in envrcs {
        s.envrc(&e, 0);
    }
    s.global_git_configs();
    if s.found.paths.len() > MAX_PATHS {
        s.found.whole_folder = true;
        s.note(format!("more than {MAX_PATHS} paths to protect: the whole folder is read-only"));
    }
    s.found
}

/// `p` with `.` and `..` resolved by name (as a shell resolves `cd`).
fn lexical(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// A regular file's bytes, at most `max` (None if larger, missing or not
/// a regular file; a FIFO is never waited on).
fn read_bounded(path: &Path, max: usize) -> Option<Vec<u8>> {
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC).open(path).ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut buf = Vec::new();
    f.take(max as u64 + 1).read_to_end(&mut buf).ok()?;
    (buf.len() <= max).then_some(buf)
}

impl Scan {
    fn note(&mut self, n: String) {
        if self.found.notes.len() < MAX_NOTES {
            self.found.notes.push(n);
        }
    }

    /// Takes `path` (absolute, or relative to `base`) if it is in the
    /// folder: as written and as the host resolves its links.
    fn take(&mut self, base: &Path, path: &Path) {
        let path = match (path.strip_prefix("~"), &self.home) {
            (Ok(rest), Some(home)) => home.join(rest),
            (Ok(_), None) => return,
            (Err(_), _) => base.join(path),
        };
        let abs = lexical(&path);
        let mut candidates = vec![abs.clone()];
        // The longest part that exists, resolved, and the rest as written.
        let mut existing = abs.clone();
        let mut rest = Vec::new();
        while !existing.as_os_str().is_empty() {
            if let Ok(c) = std::fs::canonicalize(&existing) {
                let mut c = c;
                for r in rest.iter().rev() {
                    c.push(r);
                }
                candidates.push(lexical(&c));
                break;
            }
            match (existing.file_name().map(|n| n.to_os_string()), existing.parent()) {
                (Some(n), Some(p)) => {
                    rest.push(n);
                    existing = p.to_path_buf();
                }
                _ => break,
            }
        }
        for c in candidates {
            for root in &self.roots {
                if let Ok(rel) = c.strip_prefix(root) {
                    if rel.as_os_str().is_empty() {
                        self.found.whole_folder = true;
                    } else {
                        self.found.paths.insert(rel.to_path_buf());
                    }
                }
            }
        }
    }

    /// Repositories (work trees) and `.envrc` files in the folder, breadth
    /// first, to the bounds; neither links nor mount points are crossed.
    fn tree(&mut self, root: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
        let (mut repos, mut envrcs) = (Vec::new(), Vec::new());
        let Ok(dev) = std::fs::symlink_metadata(root).map(|m| m.dev()) else { return (repos, envrcs) };
        let mut todo = VecDeque::from([(root.to_path_buf(), 0usize)]);
        let mut seen = 0usize;
        while let Some((dir, depth)) = todo.pop_front() {
            let Ok(rd) = std::fs::read_dir(&dir) else { continue };
            for e in rd.flatten() {
                seen += 1;
                if seen > MAX_TREE_ENTRIES {
                    self.note(format!(
                        "{}: more than {MAX_TREE_ENTRIES} entries; repositories and .envrc files deeper were not read",
                        root.display()
                    ));
                    return (repos, envrcs);
                }
                let name = e.file_name();
                let Ok(m) = e.metadata() else { continue };
                let n = name.to_str().unwrap_or_default();
                if same_name(n, GIT_DIR) {
                    repos.push(dir.clone());
                    continue;
                }
                if same_name(n, ".envrc") && m.is_file() {
                    envrcs.push(e.path());
                }
                if m.is_dir() && m.dev() == dev && depth < MAX_TREE_DEPTH && n != "node_modules" {
                    todo.push_back((e.path(), depth + 1));
                }
            }
        }
        (repos, envrcs)
    }

    /// The configs of the repository whose work tree is `work`.
    fn repository(&mut self, work: &Path) {
        let dotgit = work.join(GIT_DIR);
        let git_dir = if dotgit.is_dir() {
            dotgit
        } else {
            let Some(text) = read_bounded(&dotgit, 4096) else { return };
            let text = String::from_utf8_lossy(&text);
            let Some(target) = text.lines().next().and_then(|l| l.strip_prefix("gitdir:")) else { return };
            lexical(&work.join(target.trim()))
        };
        let common = match read_bounded(&git_dir.join("commondir"), 4096) {
            Some(t) => lexical(&git_dir.join(String::from_utf8_lossy(&t).trim())),
            None => git_dir.clone(),
        };
        for config in [common.join("config"), git_dir.join("config.worktree"), common.join("config.worktree")] {
            self.git_config(&config, work, 0);
        }
        self.lefthook(work);
    }

    fn global_git_configs(&mut self) {
        let mut files = vec![PathBuf::from("/etc/gitconfig")];
        if let Some(g) = std::env::var_os("GIT_CONFIG_GLOBAL") {
            files.push(PathBuf::from(g));
        }
        if let Some(home) = self.home.clone() {
            files.push(home.join(".gitconfig"));
            let xdg = std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from).unwrap_or_else(|| home.join(".config"));
            files.push(xdg.join("git/config"));
        }
        // Global commands run from wherever the user is: the folder's root
        // stands for it.
        let root = self.roots[0].clone();
        for f in files {
            self.git_config(&f, &root, 0);
        }
    }

    /// One git config file (`work`: the work tree relative commands and
    /// hooks are found from).
    fn git_config(&mut self, file: &Path, work: &Path, depth: usize) {
        let file = lexical(file);
        if depth > MAX_INCLUDE_DEPTH || !self.configs_seen.insert(file.clone()) {
            return;
        }
        if self.files_read >= MAX_FILES {
            self.note(format!("{}: more than {MAX_FILES} config files; not read", file.display()));
            return;
        }
        self.files_read += 1;
        let Some(text) = read_bounded(&file, MAX_CONFIG) else { return };
        let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
        for (section, key, value) in git_entries(&String::from_utf8_lossy(&text)) {
            let key = key.to_ascii_lowercase();
            let section = section.to_ascii_lowercase();
            let include = (section == "include" || section.starts_with("includeif")) && key == "path";
            if include {
                self.take(&base, Path::new(&value));
                let target = match value.strip_prefix("~/") {
                    Some(rest) => match &self.home {
                        Some(h) => h.join(rest),
                        None => continue,
                    },
                    None => base.join(&value),
                };
                self.git_config(&target, work, depth + 1);
            } else if GIT_PATH_KEYS.contains(&key.as_str())
                && !GIT_PATH_DATA_SECTIONS.iter().any(|s| section.split('.').next() == Some(*s))
            {
                if !value.is_empty() {
                    self.take(work, Path::new(&value));
                }
            } else if GIT_COMMAND_KEYS.contains(&key.as_str())
                || GIT_COMMAND_SECTIONS.iter().any(|s| section.split('.').next() == Some(*s))
                || section == "alias" && value.starts_with('!')
            {
                for word in words(value.trim_start_matches('!')) {
                    if word.contains('/') && !word.contains("://") {
                        self.take(work, Path::new(&word));
                    }
                }
            }
        }
    }

    /// lefthook's `source_dir`/`source_dir_local`, if a config at the
    /// work tree's root sets them.
    fn lefthook(&mut self, work: &Path) {
        for name in
            ["lefthook.yml", "lefthook.yaml", ".lefthook.yml", ".lefthook.yaml", "lefthook.toml", "lefthook.json"]
        {
            let Some(text) = read_bounded(&work.join(name), MAX_SCRIPT) else { continue };
            for line in String::from_utf8_lossy(&text).lines() {
                let l = line.trim_start().trim_start_matches('"');
                for key in ["source_dir_local", "source_dir"] {
                    if let Some(rest) = l.strip_prefix(key) {
                        let rest = rest.trim_start_matches('"').trim_start();
                        if let Some(v) = rest.strip_prefix(':').or_else(|| rest.strip_prefix('=')) {
                            let v = v.trim().trim_end_matches(',').trim_matches(|c| c == '"' || c == '\'');
                            if !v.is_empty() {
                                self.take(work, Path::new(v));
                            }
                            break;
                        }
                    }
                }
            }
        }
    }

    /// A direnv script (`.envrc`, or a file it sources).
    fn envrc(&mut self, file: &Path, depth: usize) {
        let file = lexical(file);
        if depth > MAX_INCLUDE_DEPTH || !self.scripts_seen.insert(file.clone()) || self.files_read >= MAX_FILES {
            return;
        }
        self.files_read += 1;
        let Some(text) = read_bounded(&file, MAX_SCRIPT) else {
            if file.exists() {
                self.note(format!("{}: not read (larger than {MAX_SCRIPT} bytes?)", file.display()));
            }
            return;
        };
        let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let text = String::from_utf8_lossy(&text).replace("\\\n", " ");
        for (n, line) in text.lines().enumerate() {
            for cmd in commands(line) {
                self.envrc_command(&file, n + 1, &dir, &cmd, depth);
            }
        }
    }

    /// Expands what can be known of a word of a script in `dir`; None
    /// (noted) if it holds anything else.
    fn expand(&mut self, file: &Path, line: usize, dir: &Path, word: &str) -> Option<String> {
        let d = dir.display().to_string();
        let layout = dir.join(".direnv").display().to_string();
        let home = self.home.as_ref().map(|h| h.display().to_string()).unwrap_or_else(|| "~".into());
        let mut w = word.to_string();
        for (from, to) in [
            ("$(direnv_layout_dir)", &layout),
            ("${direnv_layout_dir}", &layout),
            ("$direnv_layout_dir", &layout),
            ("$(pwd)", &d),
            ("${PWD}", &d),
            ("$PWD", &d),
            ("${HOME}", &home),
            ("$HOME", &home),
        ] {
            w = w.replace(from, to);
        }
        if w.contains('$') || w.contains('`') {
            self.note(format!(
                "{}:{line}: {word:?} cannot be known before it runs; what it names stays writable",
                file.display()
            ));
            return None;
        }
        Some(w)
    }

    fn envrc_command(&mut self, file: &Path, line: usize, dir: &Path, cmd: &[String], depth: usize) {
        let Some((name, args)) = cmd.split_first() else { return };
        let take_args = |s: &mut Scan, args: &[String]| {
            for a in args {
                if let Some(p) = s.expand(file, line, dir, a) {
                    s.take(dir, Path::new(&p));
                }
            }
        };
        match name.as_str() {
            "PATH_add" | "load_prefix" | "watch_file" | "watch_dir" => take_args(self, args),
            "path_add" if args.first().is_some_and(|v| v == "PATH" || v.starts_with("LD_")) => {
                take_args(self, &args[1..])
            }
            "source_env" | "source_env_if_exists" | "source" | "." | "dotenv" | "dotenv_if_exists" => {
                let files =
                    if args.is_empty() && name.starts_with("dotenv") { vec![".env".into()] } else { args.to_vec() };
                for a in &files {
                    let Some(p) = self.expand(file, line, dir, a) else { continue };
                    self.take(dir, Path::new(&p));
                    let mut target = dir.join(&p);
                    if target.is_dir() {
                        target = target.join(".envrc");
                        let t = target.clone();
                        self.take(dir, &t);
                    }
                    if name.starts_with("dotenv") {
                        self.dotenv(&target, dir);
                    } else {
                        self.envrc(&target, depth + 1);
                    }
                }
            }
            "source_up" | "source_up_if_exists" => {
                let fname = args.first().cloned().unwrap_or_else(|| ".envrc".into());
                let Some(fname) = self.expand(file, line, dir, &fname) else { return };
                let mut up = dir.parent();
                for _ in 0..MAX_ANCESTORS {
                    let Some(d) = up else { break };
                    self.take(d, Path::new(&fname));
                    let target = d.join(&fname);
                    if target.is_file() {
                        self.envrc(&target, depth + 1);
                    }
                    up = d.parent();
                }
            }
            "layout" | "use" => {
                let Some(what) = args.first() else { return };
                let table = if name == "layout" { LAYOUT_DIRS } else { USE_FILES };
                match table.iter().find(|(n, _)| n == what) {
                    Some((_, paths)) => {
                        for p in *paths {
                            self.take(dir, Path::new(p));
                        }
                        // `use nix FILE`, `use flake PATH#attr`.
                        for a in &args[1..] {
                            let a = a.split('#').next().unwrap_or_default();
                            if a.starts_with('-') || a.is_empty() {
                                continue;
                            }
                            if let Some(p) = self.expand(file, line, dir, a) {
                                self.take(dir, Path::new(&p));
                                if what == "flake" {
                                    self.take(dir, &Path::new(&p).join("flake.nix"));
                                    self.take(dir, &Path::new(&p).join("flake.lock"));
                                }
                            }
                        }
                    }
                    None if NAMES_NOTHING.contains(&what.as_str()) => {}
                    None => self.note(format!(
                        "{}:{line}: `{name} {what}` is not known to sbx; what it loads stays writable",
                        file.display()
                    )),
                }
            }
            "export" => {
                for a in args {
                    self.assignment(file, line, dir, a);
                }
            }
            a if a.contains('=') => self.assignment(file, line, dir, a),
            _ => {}
        }
    }

    /// `VAR=VALUE` in a script: the paths of an exec variable's value.
    fn assignment(&mut self, file: &Path, line: usize, dir: &Path, a: &str) {
        let Some((var, value)) = a.split_once('=') else { return };
        if !EXEC_VARS.contains(&var) {
            return;
        }
        for part in value.split(|c: char| c == ':' || c.is_whitespace()) {
            if part.is_empty()
                || part == "$PATH"
                || part == "${PATH}"
                || *part == format!("${var}")
                || part.starts_with('-')
            {
                continue;
            }
            let plain = !part.contains('/') && !part.contains('$') && var != "PATH";
            if plain {
                continue; // a command found on PATH
            }
            if let Some(p) = self.expand(file, line, dir, part) {
                self.take(dir, Path::new(&p));
            }
        }
    }

    /// A dotenv file: its exec variables' paths.
    fn dotenv(&mut self, file: &Path, dir: &Path) {
        if self.files_read >= MAX_FILES {
            return;
        }
        self.files_read += 1;
        let Some(text) = read_bounded(file, MAX_SCRIPT) else { return };
        for (n, line) in String::from_utf8_lossy(&text).lines().enumerate() {
            let l = line.trim().trim_start_matches("export ").trim();
            let l: String = l.chars().filter(|&c| c != '"' && c != '\'').collect();
            self.assignment(file, n + 1, dir, &l);
        }
    }
}

/// A line of shell split into commands (at `;`, `&&`, `||`, `|`), each into
/// words: quotes group (and are removed), `#` at a word's start ends the
/// line.
fn commands(line: &str) -> Vec<Vec<String>> {
    let mut cmds = vec![Vec::new()];
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = line.chars().peekable();
    let end_word = |cmds: &mut Vec<Vec<String>>, word: &mut String, in_word: &mut bool| {
        if *in_word {
            if let Some(c) = cmds.last_mut() {
                c.push(std::mem::take(word));
            }
            *in_word = false;
        }
    };
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, '\\') => {
                if let Some(n) = chars.next() {
                    word.push(n);
                    in_word = true;
                }
            }
            (None, '#') if !in_word => break,
            (None, ';' | '&' | '|') => {
                end_word(&mut cmds, &mut word, &mut in_word);
                if chars.peek() == Some(&c) {
                    chars.next();
                }
                cmds.push(Vec::new());
            }
            (None, c) if c.is_whitespace() => end_word(&mut cmds, &mut word, &mut in_word),
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    end_word(&mut cmds, &mut word, &mut in_word);
    cmds.retain(|c| !c.is_empty());
    cmds
}

/// The words of one command.
fn words(s: &str) -> Vec<String> {
    commands(s).into_iter().flatten().collect()
}

/// A git config's entries: (section with subsection, key, value). The
/// syntax as git reads it: `[section]`, `[section "sub"]`,
/// `[section.sub]`, `key = value` (quotes, `\` escapes and continuations,
/// `#`/`;` comments), a key alone.
fn git_entries(text: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut section = String::new();
    let text = text.replace("\\\r\n", "").replace("\\\n", "");
    for raw in text.lines() {
        let mut line = raw.trim_start();
        if line.starts_with('[') {
            let Some(end) = line.find(']') else { continue };
            let head = &line[1..end];
            section = match head.split_once(char::is_whitespace) {
                Some((s, sub)) => format!("{s}.{}", sub.trim().trim_matches('"')),
                None => head.to_string(),
            };
            line = line[end + 1..].trim_start();
        }
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let (key, value) = match line.split_once('=') {
            Some((k, v)) => (k.trim(), v.trim()),
            None => (line.trim(), ""),
        };
        let mut val = String::new();
        let mut quoted = false;
        let mut chars = value.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => quoted = !quoted,
                '\\' => match chars.next() {
                    Some('n') => val.push('\n'),
                    Some('t') => val.push('\t'),
                    Some(c) => val.push(c),
                    None => {}
                },
                '#' | ';' if !quoted => break,
                c => val.push(c),
            }
        }
        out.push((section.clone(), key.to_string(), val.trim_end().to_string()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn found(setup: impl FnOnce(&Path)) -> (tempfile::TempDir, Found) {
        let t = tempfile::tempdir().unwrap();
        let w = t.path().join("work");
        fs::create_dir_all(w.join(".git")).unwrap();
        setup(&w);
        let f = scan(&w);
        (t, f)
    }

    fn has(f: &Found, p: &str) -> bool {
        f.paths.contains(Path::new(p))
    }

    #[test]
    fn shell_lines_split_into_commands_and_words() {
        assert_eq!(
            commands("PATH_add 'a b' \"c\"d && use flake; x|y # PATH_add z"),
            vec![vec!["PATH_add", "a b", "cd"], vec!["use", "flake"], vec!["x"], vec!["y"]]
        );
        assert_eq!(commands("  # only a comment"), Vec::<Vec<String>>::new());
        assert_eq!(commands(r"a\ b c#d"), vec![vec!["a b", "c#d"]]);
    }

    #[test]
    fn git_config_entries_as_git_reads_them() {
        let e = git_entries(
            "[core] hooksPath = \"my hooks\" ; c\n[includeIf \"gitdir:~/w/\"]\n\tpath = a\\\nb\n[x.y]\nflag\n# k = v\n",
        );
        assert_eq!(
            e,
            vec![
                ("core".into(), "hooksPath".into(), "my hooks".into()),
                ("includeIf.gitdir:~/w/".into(), "path".into(), "ab".into()),
                ("x.y".into(), "flag".into(), "".into()),
            ]
        );
    }

    #[test]
    fn only_what_runs_or_configs_is_taken() {
        let (t, f) = found(|w| {
            fs::write(
                w.join(".git/config"),
                "[alias]\n\tco = checkout src/\n\tx = !sh tools/x.sh\n[submodule \"v\"]\n\tpath = vendor/v\n\
                 [remote \"o\"]\n\turl = ./\n[commit]\n\ttemplate = docs/msg.txt\n[core]\n\tsshCommand = ssh -i keys/id\n",
            )
            .unwrap();
        });
        assert!(has(&f, "tools/x.sh") && has(&f, "keys/id"), "{:?}", f.paths);
        for p in ["src", "src/", "vendor/v", "docs/msg.txt"] {
            assert!(!has(&f, p), "{p}: {:?}", f.paths);
        }
        assert!(!f.whole_folder);
        drop(t);
        // Through a link in the folder: the link and where it leads.
        let (_t, f) = found(|w| {
            fs::create_dir_all(w.join("real/hooks")).unwrap();
            std::os::unix::fs::symlink("real/hooks", w.join("hooks")).unwrap();
            fs::write(w.join(".git/config"), "[core]\n\thooksPath = hooks\n").unwrap();
        });
        assert!(has(&f, "hooks") && has(&f, "real/hooks"), "{:?}", f.paths);
        // A hooks directory that is the folder itself.
        let (_t, f) = found(|w| fs::write(w.join(".git/config"), "[core]\n\thooksPath = .\n").unwrap());
        assert!(f.whole_folder);
    }

    #[test]
    fn a_repository_above_the_folder_counts() {
        let t = tempfile::tempdir().unwrap();
        let repo = t.path().join("repo");
        fs::create_dir_all(repo.join(".git")).unwrap();
        fs::create_dir_all(repo.join("sub")).unwrap();
        fs::write(repo.join(".git/config"), "[core]\n\thooksPath = sub/hooks\n").unwrap();
        fs::write(repo.join(".envrc"), "PATH_add sub/bin\n").unwrap();
        let f = scan(&repo.join("sub"));
        assert!(has(&f, "hooks") && has(&f, "bin"), "{:?}", f.paths);
    }
}

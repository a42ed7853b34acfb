//! Host side: workspace mode `--clone` and `sbx fetch` — agents working
//! in parallel on one repository, each in its own git clone on its own
//! sandbox disk, reviewed and merged on the host like pull requests.
//!
//! ```text
//! sbx run AGENT --clone [--name NAME]     a sandbox with its own clone
//! sbx fetch NAME                          its branches -> refs/remotes/sbx-NAME/*
//! ```
//!
//! **Clone in.** `sbx run --clone` makes a new sandbox whose workspace
//! folder is *not shared* with the guest at all (no virtio-fs device for
//! it; `--mount` folders still are). When the sandbox is created, sbx
//! runs the host's git on the user's own repository: `git bundle create
//! FILE HEAD --branches --tags` into the sandbox's private folder. At the
//! first start the bundle is streamed into the guest over the control
//! channel (a pipe session, as `sbx cp` does), and the guest's git clones
//! it, as the run's user, into [`GUEST_STORE`]`/repo` on the sandbox's
//! own disk (the persistent overlay root), checking out the host's
//! current branch (the host's other branches are `origin/*`). `origin`
//! then points at the host repository's `origin` URL, its user and
//! password taken out (or is removed when that is a local path). At every
//! start a root session bind-mounts the clone at the workspace's host
//! path, so the agent finds it where the workspace normally appears, and
//! only then does the program start (its session waits for that, see
//! [`wrap_argv`]). `clone.json` in the sandbox's folder records that it
//! is a clone sandbox, of which repository, for which user, and whether
//! the clone was made: later `sbx run NAME` never clones again and never
//! shares the folder, with or without `--clone`.
//!
//! What the clone has: the commits of the host's branches and tags and
//! HEAD, as committed. **Not copied**: untracked and ignored files
//! (build output, `.env`, local configuration: copy what is needed with
//! `sbx cp`), uncommitted changes (commit or stash them first), the
//! host's `.git/config`, hooks and stashes. **Submodules** are not
//! cloned (their commits are recorded, their repositories are not in the
//! bundle: the guest can `git submodule update --init` over the network
//! if the policy allows). **Git LFS** files arrive as pointer files
//! (the guest has no git-lfs; fetch them from inside if it is installed
//! and the network allows). A **shallow** repository is refused (its
//! bundle would lack history it names: `git fetch --unshallow` first).
//!
//! **Fetch out.** `sbx fetch NAME` has the guest write
//! `git bundle create - --branches` (in a session beside the running program, or, when the
//! sandbox is stopped, as the program of a short `sbx run --no-network`
//! of the sandbox) into a private host temporary file, at most
//! [`MAX_BUNDLE_BYTES`] (past it the fetch is refused). Its header is
//! parsed here strictly ([`parse_bundle_header`]: version 2 or 3, at
//! most [`MAX_BUNDLE_REFS`] refs, every name under `refs/heads/` and
//! valid by git's rules and stricter ones: [`valid_branch_ref`]), then
//! the host's git fetches **from that file only** into
//! `refs/remotes/sbx-NAME/*` ([`fetch_command`]: `--prune`, no tags, no
//! FETCH_HEAD, no submodules, with `transfer.fsckObjects` and
//! `fetch.fsckObjects` on so a malformed object fails the fetch). The
//! host's working tree, index and HEAD are not touched: review with `git
//! log sbx-NAME/BRANCH`, merge as any remote branch.
//!
//! Why a bundle and never the guest's `.git`: host git run in a directory
//! the guest wrote would read the guest's config and hooks —
//! `core.fsmonitor`, `core.hooksPath`, aliases, filters, `core.sshCommand`
//! are commands git runs — code execution on the host. A bundle is data:
//! git reads its refs and pack and nothing of the guest's configuration.
//! The host's own repository (its `.git`) is never shared with a clone
//! sandbox, so what git runs there is the user's own.
//!
//! Audit: the clone (repository, branch, the bundle's SHA-256 and size)
//! is a `clone` event in the sandbox's audit log, written by the run that
//! makes it; a fetch that starts the sandbox itself is a `fetch` event
//! (the refs fetched), appended once that run has ended, under the
//! sandbox's running lock. A fetch from a running sandbox is not in the
//! audit log (its VMM owns the log's chain) — it says so.

use std::fs;
use std::io::{self, BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use protocol::session::{Frame, Open, MAX_DATA};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::client;
use crate::copy::SessionOut;
use crate::escape;
use crate::sandbox::{self, Sandbox};

/// The largest bundle a fetch takes from the guest.
pub const MAX_BUNDLE_BYTES: u64 = 1 << 30;
/// The largest bundle header (its ref and prerequisite lines).
pub const MAX_BUNDLE_HEADER: usize = 1 << 20;
/// The most refs (and, apart, prerequisites) a bundle from the guest may
/// name.
pub const MAX_BUNDLE_REFS: usize = 10_000;
/// Longest ref name taken from the guest.
pub const MAX_REF_LEN: usize = 255;
/// Where the clone lives in the guest (on the sandbox's own disk): the
/// repository in `repo`, the incoming bundle beside it while cloning.
pub const GUEST_STORE: &str = "/var/lib/sbx-clone";
/// Where the start's setup tells the waiting program it is done
/// (`ready`) or failed (`failed`, the reason): a tmpfs, new each boot.
pub const GUEST_SIGNAL_DIR: &str = "/run/sbx-clone";
/// How long the program waits for the setup, in 0.2 s steps (10 min).
const WAIT_STEPS: u32 = 3000;
/// The sandbox's record of its clone.
const STATE_FILE: &str = "clone.json";
/// The bundle made at creation, until the guest has cloned it.
const IN_BUNDLE: &str = "clone-in.bundle";
/// Guest output kept for a message.
const MAX_GUEST_OUTPUT: usize = 4096;
/// How long the setup waits for the guest to accept sessions.
const SETUP_WAIT: Duration = Duration::from_secs(600);

#[derive(Debug, Error)]
pub enum CloneError {
    #[error("--clone: {0} is not a git repository's top folder (run in the repository's root or pass --workspace)")]
    NotARepo(PathBuf),
    #[error("--clone: {0} is a shallow repository: its bundle would lack history (`git fetch --unshallow` first)")]
    Shallow(PathBuf),
    #[error("--clone: {0} has no commits yet: commit first (only commits are cloned)")]
    NoCommits(PathBuf),
    #[error("Cannot run the host's git ({0}): {1} (is git installed?)")]
    Git(String, io::Error),
    #[error("The host's git failed ({0}): {1}")]
    GitFailed(String, String),
    #[error("Sandbox '{0}' shares its workspace folder: --clone needs a new sandbox (use another --name)")]
    NotACloneSandbox(String),
    #[error("Sandbox '{0}' is not a --clone sandbox: `sbx fetch` takes branches from clone sandboxes only")]
    FetchNotClone(String),
    #[error("Sandbox state {0}: {1}")]
    State(PathBuf, String),
    #[error("The guest's bundle is larger than {MAX_BUNDLE_BYTES} bytes: refused (nothing fetched)")]
    TooLarge,
    #[error("The guest's bundle is refused: {0} (nothing fetched)")]
    BadBundle(String),
    #[error("The guest has no branches to fetch (nothing fetched)")]
    NoBranches,
    #[error("Sandbox name '{0}' does not make a valid remote name sbx-{0}: rename the sandbox")]
    RemoteName(String),
    #[error("The guest's git bundle failed: {0}")]
    GuestFailed(String),
    #[error("Cannot write the bundle to {0}: {1}")]
    Temp(PathBuf, io::Error),
    #[error("Cannot start the sandbox to fetch from: {0}")]
    Start(io::Error),
    #[error(transparent)]
    Sandbox(#[from] sandbox::Error),
    #[error(transparent)]
    Session(#[from] client::Error),
    #[error(transparent)]
    Admin(#[from] crate::machine_policy::Error),
}

/// What `clone.json` keeps.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CloneState {
    /// The host repository cloned (the sandbox's workspace).
    pub repo: PathBuf,
    /// The guest user who owns the clone (the creating run's `--user`).
    pub user: String,
    /// The host's branch checked out in the clone (None: HEAD detached).
    pub branch: Option<String>,
    /// The host's `origin` URL for the clone's `origin` (no user or
    /// password), if it has a usable one.
    pub origin: Option<String>,
    /// The guest has made its clone.
    pub cloned: bool,
}

impl CloneState {
    /// The sandbox's record, if it is a clone sandbox.
    pub fn load(dir: &Path) -> Result<Option<CloneState>, CloneError> {
        let path = dir.join(STATE_FILE);
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| CloneError::State(path, e.to_string())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CloneError::State(path, e.to_string())),
        }
    }

    pub fn save(&self, dir: &Path) -> Result<(), CloneError> {
        let path = dir.join(STATE_FILE);
        let fail = |e: String| CloneError::State(path.clone(), e);
        let json = serde_json::to_vec_pretty(self).map_err(|e| fail(e.to_string()))?;
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, json).and_then(|_| fs::rename(&tmp, &path)).map_err(|e| fail(e.to_string()))
    }
}

// ---- ref names and bundles from the guest ----

/// A branch ref from the guest: `refs/heads/NAME`, NAME valid by git's
/// check-ref-format rules and, stricter, printable ASCII without space,
/// at most [`MAX_REF_LEN`] bytes in all.
pub fn valid_branch_ref(name: &str) -> bool {
    name.len() <= MAX_REF_LEN
        && name.strip_prefix("refs/heads/").is_some_and(|b| !b.is_empty())
        && valid_ref_format(name)
}

/// git check-ref-format's rules (at least two components), in printable
/// ASCII only, no component ending with '.'.
pub fn valid_ref_format(name: &str) -> bool {
    let bytes = name.as_bytes();
    if !bytes.iter().all(|b| b.is_ascii_graphic())
        || name.contains("..")
        || name.contains("@{")
        || name == "@"
        || name.ends_with('.')
        || name.split('/').count() < 2
    {
        return false;
    }
    if bytes.iter().any(|b| matches!(b, b'~' | b'^' | b':' | b'?' | b'*' | b'[' | b'\\')) {
        return false;
    }
    // Stricter than git: no component ends with '.' either.
    name.split('/').all(|c| !c.is_empty() && !c.starts_with('.') && !c.ends_with('.') && !c.ends_with(".lock"))
}

/// A bundle's header, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleHeader {
    pub version: u8,
    /// Commits the receiver must already have.
    pub prerequisites: Vec<String>,
    /// (object id, ref name), each a valid branch ref.
    pub refs: Vec<(String, String)>,
}

fn is_oid(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Parses a bundle's header (through the blank line before the pack),
/// strictly: version 2 or 3 (v3 with only the `object-format` capability),
/// full hexadecimal object ids, branch refs only, each once, bounded
/// ([`MAX_BUNDLE_HEADER`], [`MAX_BUNDLE_REFS`]). Anything else fails.
pub fn parse_bundle_header<R: BufRead>(mut r: R) -> Result<BundleHeader, CloneError> {
    let bad = |why: String| CloneError::BadBundle(why);
    let mut total = 0usize;
    let mut next_line = |r: &mut R| -> Result<String, CloneError> {
        let mut line = Vec::new();
        let room = (MAX_BUNDLE_HEADER - total) as u64 + 1;
        r.by_ref().take(room).read_until(b'\n', &mut line).map_err(|e| bad(format!("cannot read it: {e}")))?;
        total += line.len();
        if total > MAX_BUNDLE_HEADER {
            return Err(bad(format!("its header is longer than {MAX_BUNDLE_HEADER} bytes")));
        }
        if line.pop() != Some(b'\n') {
            return Err(bad("it ends inside its header".into()));
        }
        String::from_utf8(line).map_err(|_| bad("its header is not UTF-8".into()))
    };
    let version = match next_line(&mut r)?.as_str() {
        "# v2 git bundle" => 2,
        "# v3 git bundle" => 3,
        other => return Err(bad(format!("not a git bundle (first line '{}')", escape::line(other)))),
    };
    let mut header = BundleHeader { version, prerequisites: Vec::new(), refs: Vec::new() };
    loop {
        let line = next_line(&mut r)?;
        if line.is_empty() {
            break;
        }
        if let Some(cap) = line.strip_prefix('@') {
            if version != 3 || !matches!(cap, "object-format=sha1" | "object-format=sha256") {
                return Err(bad(format!("capability '{}' is not accepted", escape::line(cap))));
            }
        } else if let Some(rest) = line.strip_prefix('-') {
            let oid = rest.split(' ').next().unwrap_or_default();
            if !is_oid(oid) {
                return Err(bad(format!("prerequisite '{}' is not an object id", escape::line(rest))));
            }
            if header.prerequisites.len() >= MAX_BUNDLE_REFS {
                return Err(bad(format!("more than {MAX_BUNDLE_REFS} prerequisites")));
            }
            header.prerequisites.push(oid.to_string());
        } else {
            let (oid, name) = line.split_once(' ').unwrap_or((&line, ""));
            if !is_oid(oid) {
                return Err(bad(format!("ref line '{}' has no object id", escape::line(&line))));
            }
            if !valid_branch_ref(name) {
                return Err(bad(format!("ref name '{}' is not a plain branch name", escape::line(name))));
            }
            if header.refs.iter().any(|(_, n)| n == name) {
                return Err(bad(format!("ref '{}' appears twice", escape::line(name))));
            }
            if header.refs.len() >= MAX_BUNDLE_REFS {
                return Err(bad(format!("more than {MAX_BUNDLE_REFS} refs")));
            }
            header.refs.push((oid.to_string(), name.to_string()));
        }
    }
    Ok(header)
}

/// The remote's name for sandbox `name`: `sbx-NAME`, checked as a ref
/// component.
pub fn remote_name(name: &str) -> Result<String, CloneError> {
    let remote = format!("sbx-{name}");
    if sandbox::valid_name(name) && valid_ref_format(&format!("refs/remotes/{remote}/x")) {
        Ok(remote)
    } else {
        Err(CloneError::RemoteName(name.to_string()))
    }
}

/// The host's git, for the user's own repository `repo`: the user's
/// configuration (trusted), a clean environment for what sbx decides
/// (no terminal prompts, no repository redirected by the environment).
fn host_git(repo: &Path) -> Command {
    let mut c = Command::new("git");
    for var in ["GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_COMMON_DIR"] {
        c.env_remove(var);
    }
    c.env("GIT_TERMINAL_PROMPT", "0").arg("-C").arg(repo).stdin(Stdio::null());
    c
}

/// The host's fetch from the guest's bundle file into
/// `refs/remotes/REMOTE/*`: objects checked (fsck), old branches pruned,
/// no tags, no FETCH_HEAD, no submodules; the bundle is the only source.
pub fn fetch_command(repo: &Path, bundle: &Path, remote: &str) -> Command {
    let mut c = host_git(repo);
    c.args(["-c", "transfer.fsckObjects=true", "-c", "fetch.fsckObjects=true", "-c", "fetch.recurseSubmodules=false"]);
    c.args(["fetch", "--quiet", "--no-tags", "--prune", "--no-write-fetch-head", "--no-auto-gc"]);
    c.args(["--recurse-submodules=no", "--"]).arg(bundle).arg(format!("+refs/heads/*:refs/remotes/{remote}/*"));
    c
}

fn git_output(mut c: Command, what: &str) -> Result<String, CloneError> {
    let out = c.stderr(Stdio::piped()).output().map_err(|e| CloneError::Git(what.into(), e))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(CloneError::GitFailed(what.into(), escape::line(&said)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// An `origin` URL fit for the guest: a URL's user and password dropped;
/// local paths (meaningless in the guest) none.
pub fn guest_origin(url: &str) -> Option<String> {
    if url.is_empty() || url.starts_with('/') || url.starts_with('.') || url.starts_with("file:") {
        return None;
    }
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (auth, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
            let host = auth.rsplit_once('@').map_or(auth, |(_, h)| h);
            Some(if rest.contains('/') { format!("{scheme}://{host}/{path}") } else { format!("{scheme}://{host}") })
        }
        // scp-like user@host:path names a user, no secret.
        None => Some(url.to_string()),
    }
}

/// At creation of a clone sandbox: checks the host repository and makes
/// its bundle in the sandbox's folder. Returns the state to keep.
pub fn prepare(sb: &Sandbox, user: &str) -> Result<CloneState, CloneError> {
    let repo = sb.settings.workspace.clone();
    let top = git_output(
        {
            let mut c = host_git(&repo);
            c.args(["rev-parse", "--show-toplevel"]);
            c
        },
        "rev-parse",
    )
    .map_err(|_| CloneError::NotARepo(repo.clone()))?;
    if fs::canonicalize(&top).ok().as_deref() != Some(repo.as_path()) {
        return Err(CloneError::NotARepo(repo));
    }
    let shallow = git_output(
        {
            let mut c = host_git(&repo);
            c.args(["rev-parse", "--is-shallow-repository"]);
            c
        },
        "rev-parse",
    )?;
    if shallow == "true" {
        return Err(CloneError::Shallow(repo));
    }
    let mut head = host_git(&repo);
    head.args(["rev-parse", "--verify", "-q", "HEAD"]);
    if git_output(head, "rev-parse HEAD").is_err() {
        return Err(CloneError::NoCommits(repo));
    }
    let mut branch = host_git(&repo);
    branch.args(["symbolic-ref", "-q", "HEAD"]);
    let branch = git_output(branch, "symbolic-ref")
        .ok()
        .and_then(|r| r.strip_prefix("refs/heads/").map(str::to_string))
        .filter(|b| valid_branch_ref(&format!("refs/heads/{b}")));
    let mut origin = host_git(&repo);
    origin.args(["config", "--get", "remote.origin.url"]);
    let origin = git_output(origin, "config").ok().and_then(|u| guest_origin(&u));
    let bundle = sb.dir().join(IN_BUNDLE);
    let mut create = host_git(&repo);
    create.args(["bundle", "create", "--quiet"]).arg(&bundle).args(["HEAD", "--branches", "--tags"]);
    git_output(create, "bundle create")?;
    let state = CloneState { repo, user: user.to_string(), branch, origin, cloned: false };
    state.save(sb.dir())?;
    Ok(state)
}

// ---- the guest's side, as scripts run by its sh (busybox) ----

/// The program's wrapper (the run's main session, as its user, from
/// `/`): waits for the start's setup to say ready (or failed), then runs
/// the program in the workspace. `$1` the workspace, the rest the
/// program.
pub fn wrap_argv(workspace: &str, argv: Vec<String>) -> Vec<String> {
    let script = format!(
        "i=0; while [ ! -e {GUEST_SIGNAL_DIR}/ready ]; do \
           if [ -e {GUEST_SIGNAL_DIR}/failed ]; then cat {GUEST_SIGNAL_DIR}/failed >&2; exit 125; fi; \
           i=$((i+1)); if [ $i -gt {WAIT_STEPS} ]; then echo 'sbx: the clone was not set up in time' >&2; exit 125; fi; \
           sleep 0.2; done; cd \"$1\" && shift && exec \"$@\""
    );
    let mut out = vec!["/bin/sh".to_string(), "-c".to_string(), script, "sbx-clone".to_string(), workspace.to_string()];
    out.extend(argv);
    out
}

/// As root, first start: the store, owned by the clone's user (`$1`).
const PREPARE_STORE: &str = "set -e; mkdir -p /var/lib/sbx-clone; chown \"$1\" /var/lib/sbx-clone";

/// As the clone's user, first start: the bundle from stdin, cloned to
/// the store's `repo`; `$1` the branch (or empty), `$2` origin's URL (or
/// empty).
const CLONE: &str = "set -e; cd /var/lib/sbx-clone; rm -rf repo.tmp in.bundle; cat > in.bundle; \
     if [ -n \"$1\" ]; then git clone -q -b \"$1\" in.bundle repo.tmp; else git clone -q in.bundle repo.tmp; fi; \
     rm -f in.bundle; cd repo.tmp; \
     if [ -n \"$2\" ]; then git remote set-url origin \"$2\"; else git remote remove origin; fi; \
     cd ..; mv repo.tmp repo";

/// As root, every start: the clone at the workspace's path `$1` (every
/// folder on the way traversable), then ready.
const MOUNT: &str =
    "set -e; [ -d /var/lib/sbx-clone/repo ] || { echo 'the clone is gone from the sandbox disk' >&2; exit 1; }; \
     mkdir -p \"$1\"; d=\"$1\"; while [ -n \"$d\" ]; do chmod a+x \"$d\" 2>/dev/null || true; d=\"${d%/*}\"; done; \
     mount -o bind /var/lib/sbx-clone/repo \"$1\"; mkdir -p /run/sbx-clone; touch /run/sbx-clone/ready";

/// As root, when the setup failed: the reason, for the waiting program.
const FAILED: &str = "mkdir -p /run/sbx-clone; printf 'sbx: %s\\n' \"$1\" > /run/sbx-clone/failed";

/// What a guest session said and how it ended.
struct GuestRun {
    outcome: Option<client::Outcome>,
    stderr: Vec<u8>,
}

fn open(argv: Vec<String>, user: &str) -> Open {
    Open { argv, env: Vec::new(), cwd: "/".into(), user: user.into(), tty: None, main: false }
}

fn script(text: &str, args: &[&str]) -> Vec<String> {
    let mut v = vec!["/bin/sh".to_string(), "-c".into(), text.into(), "sbx-clone".into()];
    v.extend(args.iter().map(|a| a.to_string()));
    v
}

/// Runs one guest session to its end, `stdin` (a file) sent first.
fn guest_run(
    socket: &Path,
    open: Open,
    stdin: Option<&Path>,
    give_up: &dyn Fn() -> bool,
) -> Result<GuestRun, CloneError> {
    let (mut stream, reader) = client::open_pipes_until(socket, open, SETUP_WAIT, give_up)?;
    if let Some(path) = stdin {
        let mut f = fs::File::open(path).map_err(|e| CloneError::Temp(path.to_path_buf(), e))?;
        let mut buf = vec![0u8; MAX_DATA];
        loop {
            let n = f.read(&mut buf).map_err(|e| CloneError::Temp(path.to_path_buf(), e))?;
            if n == 0 {
                break;
            }
            stream.write_all(&Frame::Stdin(buf[..n].to_vec()).encode()).map_err(client::Error::Io)?;
        }
    }
    stream.write_all(&Frame::StdinEof.encode()).map_err(client::Error::Io)?;
    let mut s = SessionOut::new(stream, reader);
    s.drain().map_err(client::Error::Lost)?;
    let mut stderr = s.stderr.clone();
    stderr.truncate(MAX_GUEST_OUTPUT);
    Ok(GuestRun { outcome: s.outcome.clone(), stderr })
}

fn check(run: GuestRun, what: &str) -> Result<(), String> {
    let said = escape::escape(&run.stderr, escape::Layout::Line);
    match run.outcome {
        Some(client::Outcome::Exited(0)) => Ok(()),
        Some(client::Outcome::Exited(c)) => Err(format!("{what} exited with status {c}: {said}")),
        Some(client::Outcome::Killed(s)) => Err(format!("{what} was killed by signal {s}: {said}")),
        Some(client::Outcome::Failed(m)) => Err(format!("{what} could not run: {}", escape::line(&m))),
        None => Err(format!("{what} ended without a status")),
    }
}

/// What the start's setup did, for the audit log.
pub struct SetupDone {
    /// The clone made now: (bundle SHA-256, its size).
    pub cloned: Option<(String, u64)>,
}

/// The start's setup of a clone sandbox, beside the waiting program: on
/// the first start the clone from the bundle (then the bundle removed,
/// the state marked cloned), at every start the bind mount. On failure
/// the waiting program is told why (and exits 125).
pub fn setup(
    sb: &Sandbox,
    state: &CloneState,
    workspace: &str,
    give_up: &dyn Fn() -> bool,
) -> Result<SetupDone, String> {
    let socket = sb.control_socket();
    let result = (|| -> Result<SetupDone, String> {
        let mut done = SetupDone { cloned: None };
        if !state.cloned {
            let bundle = sb.dir().join(IN_BUNDLE);
            let digest = sha256_file(&bundle).map_err(|e| format!("the clone's bundle {}: {e}", bundle.display()))?;
            let err = |e: CloneError| e.to_string();
            let run = guest_run(&socket, open(script(PREPARE_STORE, &[&state.user]), "root"), None, give_up);
            check(run.map_err(err)?, "making the clone's folder")?;
            let args = [state.branch.as_deref().unwrap_or(""), state.origin.as_deref().unwrap_or("")];
            let run = guest_run(&socket, open(script(CLONE, &args), &state.user), Some(&bundle), give_up);
            check(run.map_err(err)?, "the guest's git clone")?;
            let mut now = state.clone();
            now.cloned = true;
            now.save(sb.dir()).map_err(err)?;
            let _ = fs::remove_file(&bundle);
            done.cloned = Some(digest);
        }
        let run = guest_run(&socket, open(script(MOUNT, &[workspace]), "root"), None, give_up);
        check(run.map_err(|e| e.to_string())?, "mounting the clone")?;
        Ok(done)
    })();
    if let Err(why) = &result {
        let _ = guest_run(&socket, open(script(FAILED, &[&format!("--clone: {why}")]), "root"), None, give_up);
    }
    result
}

fn sha256_file(path: &Path) -> io::Result<(String, u64)> {
    use sha2::Digest;
    let mut f = fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((h.finalize().iter().map(|b| format!("{b:02x}")).collect(), size))
}

// ---- sbx fetch ----

/// Copies at most `max` bytes ([`MAX_BUNDLE_BYTES`]) from `from` to
/// `to`: past it, [`CloneError::TooLarge`].
pub fn copy_bounded<R: Read, W: Write>(mut from: R, to: &mut W, temp: &Path, max: u64) -> Result<u64, CloneError> {
    let copied = io::copy(&mut from.by_ref().take(max), to).map_err(|e| CloneError::Temp(temp.into(), e))?;
    if copied == max {
        let mut one = [0u8; 1];
        if from.read(&mut one).map_err(|e| CloneError::Temp(temp.into(), e))? > 0 {
            return Err(CloneError::TooLarge);
        }
    }
    Ok(copied)
}

/// `sbx fetch NAME`.
pub fn fetch(name: &str) -> Result<ExitCode, CloneError> {
    // The admin policy's `forbid = ["clone"]` keeps guest commits out of
    // host repositories, those of sandboxes made before it too.
    let admin_path = std::path::Path::new(crate::machine_policy::PATH);
    if let Some(admin) = crate::machine_policy::load(admin_path)? {
        admin.forbids("clone")?;
    }
    let sb = Sandbox::open(&sandbox::home(), name)?;
    let state = CloneState::load(sb.dir())?.ok_or_else(|| CloneError::FetchNotClone(name.to_string()))?;
    let remote = remote_name(name)?;
    if !state.cloned {
        return Err(CloneError::GuestFailed("the sandbox has not made its clone yet (run it once)".into()));
    }
    let workspace = state.repo.to_string_lossy().into_owned();
    let tmp = TempDir(tempfile_dir()?);
    let bundle = tmp.0.join("sbx-fetch.bundle");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&bundle)
        .map_err(|e| CloneError::Temp(bundle.clone(), e))?;
    let argv: Vec<String> = ["git", "bundle", "create", "-", "--branches"].map(String::from).to_vec();
    let audited = if sb.running_pid().is_some() {
        let mut o = open(argv, &state.user);
        o.cwd = workspace.clone();
        let (mut stream, reader) = client::open_pipes(&sb.control_socket(), o, Duration::from_secs(300))?;
        stream.write_all(&Frame::StdinEof.encode()).map_err(client::Error::Io)?;
        let mut s = SessionOut::new(stream, reader);
        copy_bounded(&mut s, &mut file, &bundle, MAX_BUNDLE_BYTES)?;
        s.drain().map_err(client::Error::Lost)?;
        check(GuestRun { outcome: s.outcome.clone(), stderr: s.stderr.clone() }, "git bundle create")
            .map_err(CloneError::GuestFailed)?;
        eprintln!("sbx: fetched from the running sandbox: not in its audit log (its running VMM keeps the log)");
        false
    } else {
        let exe = std::env::current_exe().map_err(CloneError::Start)?;
        let mut child = Command::new(exe)
            .args(["run", "--name", name, "--no-network", "--no-tty", "--user", &state.user, &sb.settings.agent, "--"])
            .args(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(CloneError::Start)?;
        let out = child.stdout.take().ok_or_else(|| CloneError::Start(io::Error::other("no stdout")))?;
        let copied = copy_bounded(out, &mut file, &bundle, MAX_BUNDLE_BYTES);
        if copied.is_err() {
            let _ = child.kill();
        }
        let status = child.wait().map_err(CloneError::Start)?;
        copied?;
        if !status.success() {
            return Err(CloneError::GuestFailed(format!("the sandbox's run ended with {status} (said above)")));
        }
        true
    };
    file.sync_all().map_err(|e| CloneError::Temp(bundle.clone(), e))?;
    drop(file);
    let header = parse_bundle_header(io::BufReader::new(
        fs::File::open(&bundle).map_err(|e| CloneError::Temp(bundle.clone(), e))?,
    ))?;
    if header.refs.is_empty() {
        return Err(CloneError::NoBranches);
    }
    git_output(fetch_command(&state.repo, &bundle, &remote), "fetch from the guest's bundle")?;
    for (oid, r) in &header.refs {
        let branch = r.trim_start_matches("refs/heads/");
        println!("{oid} refs/remotes/{remote}/{branch}");
    }
    if audited {
        audit_fetch(&sb, &header, &remote);
    }
    Ok(ExitCode::SUCCESS)
}

/// A temporary folder, removed (with the bundle) however the fetch ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A private temporary folder for the bundle (0700, made new: never one
/// that was there).
fn tempfile_dir() -> Result<PathBuf, CloneError> {
    let base = std::env::temp_dir();
    for i in 0..100u32 {
        let dir = base.join(format!("sbx-fetch-{}-{}-{i}", std::process::id(), sandbox::now_unix_ms()));
        let mut b = fs::DirBuilder::new();
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
        match b.create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(CloneError::Temp(dir, e)),
        }
    }
    Err(CloneError::Temp(base, io::Error::other("no free name")))
}

/// The fetch's line in the sandbox's audit log, under its running lock
/// (no run appends meanwhile).
fn audit_fetch(sb: &Sandbox, header: &BundleHeader, remote: &str) {
    let Ok(_guard) = sb.mark_running() else {
        eprintln!("sbx: the sandbox started again: the fetch is not in its audit log");
        return;
    };
    let refs: Vec<serde_json::Value> =
        header.refs.iter().map(|(oid, r)| serde_json::json!({"ref": r, "oid": oid})).collect();
    let event = serde_json::json!({"event": "fetch", "sandbox": sb.settings.name, "remote": remote, "refs": refs});
    let now = sandbox::now_unix_ms();
    let path = sb.audit_log();
    let result =
        audit::open(&path, audit::Rotation::default(), now, |f| f).map_err(|e| e.to_string()).and_then(|mut o| {
            o.log.record(&audit::Event::Untyped(event), now).map_err(|e| e.to_string())?;
            o.log.flush_suppressed(now).map_err(|e| e.to_string())
        });
    if let Err(e) = result {
        eprintln!("sbx: the fetch is not in the audit log {}: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=main"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn repo(dir: &Path) {
        fs::create_dir_all(dir).unwrap();
        git(dir, &["init", "-q"]);
        fs::write(dir.join("f"), "one\n").unwrap();
        git(dir, &["add", "f"]);
        git(dir, &["commit", "-q", "-m", "one"]);
    }

    fn header(text: &str) -> Result<BundleHeader, CloneError> {
        parse_bundle_header(text.as_bytes())
    }

    const OID: &str = "14b4c3f420e0ca2a08e5abb37073b34b39df566a";

    #[test]
    fn branch_refs_follow_gits_rules_and_stricter_ones() {
        for ok in ["refs/heads/main", "refs/heads/feature/x-1", "refs/heads/a.b", "refs/heads/v1@2"] {
            assert!(valid_branch_ref(ok), "{ok}");
        }
        let long = format!("refs/heads/{}", "x".repeat(MAX_REF_LEN));
        for bad in [
            "HEAD",
            "refs/heads/",
            "refs/tags/v1",
            "refs/remotes/origin/main",
            "refs/heads/../../config",
            "refs/heads/a..b",
            "refs/heads/.hidden",
            "refs/heads/a/.b",
            "refs/heads/a.lock",
            "refs/heads/a//b",
            "refs/heads/a/",
            "refs/heads/a.",
            "refs/heads/a@{1}",
            "refs/heads/a b",
            "refs/heads/a\tb",
            "refs/heads/\x1b]0;x\x07",
            "refs/heads/a~1",
            "refs/heads/a^",
            "refs/heads/a:b",
            "refs/heads/a?",
            "refs/heads/a*",
            "refs/heads/a[",
            "refs/heads/a\\b",
            "refs/heads/caf\u{e9}",
            long.as_str(),
        ] {
            assert!(!valid_branch_ref(bad), "{bad:?}");
        }
        // Never laxer than git's own check.
        for ok in ["refs/heads/main", "refs/heads/feature/x-1", "refs/heads/a.b", "refs/heads/v1@2"] {
            let status = Command::new("git").args(["check-ref-format", ok]).status().unwrap();
            assert!(status.success(), "{ok}");
        }
    }

    #[test]
    fn the_remote_name_is_a_valid_ref_component() {
        assert_eq!(remote_name("a").unwrap(), "sbx-a");
        assert_eq!(remote_name("shell-proj_1").unwrap(), "sbx-shell-proj_1");
        for bad in ["x.lock", "a..b", "a.", "../x", ""] {
            assert!(matches!(remote_name(bad), Err(CloneError::RemoteName(_))), "{bad}");
        }
    }

    #[test]
    fn a_real_bundle_header_parses() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path().join("r");
        repo(&r);
        git(&r, &["branch", "feature/x"]);
        let bundle = dir.path().join("b.bundle");
        git(&r, &["bundle", "create", "--quiet", bundle.to_str().unwrap(), "--branches"]);
        let h = parse_bundle_header(io::BufReader::new(fs::File::open(&bundle).unwrap())).unwrap();
        let head = git(&r, &["rev-parse", "HEAD"]);
        assert_eq!(h.version, 2);
        assert!(h.prerequisites.is_empty());
        assert_eq!(
            h.refs,
            vec![(head.clone(), "refs/heads/feature/x".to_string()), (head, "refs/heads/main".to_string())]
        );
    }

    #[test]
    fn hostile_bundle_headers_fail_closed() {
        assert!(header(&format!("# v2 git bundle\n{OID} refs/heads/main\n\nPACK")).is_ok());
        assert!(header(&format!("# v3 git bundle\n@object-format=sha1\n-{OID} c\n{OID} refs/heads/m\n\n")).is_ok());
        let many: String = (0..=MAX_BUNDLE_REFS).map(|i| format!("{OID} refs/heads/b{i}\n")).collect();
        let huge = format!("# v2 git bundle\n{OID} refs/heads/{}\n\n", "x".repeat(MAX_BUNDLE_HEADER));
        let cases = [
            "".to_string(),
            "PACK".to_string(),
            "# v9 git bundle\n\n".to_string(),
            format!("# v2 git bundle\n{OID} refs/heads/main\n"),
            format!("# v2 git bundle\n{OID} refs/heads/main"),
            format!("# v2 git bundle\n{OID} HEAD\n\n"),
            format!("# v2 git bundle\n{OID} refs/tags/v1\n\n"),
            format!("# v2 git bundle\n{OID} refs/remotes/sbx-b/main\n\n"),
            format!("# v2 git bundle\n{OID} refs/heads/../../../HEAD\n\n"),
            format!("# v2 git bundle\n{OID} refs/heads/\x1b[2J\n\n"),
            format!("# v2 git bundle\n{OID} refs/heads/a\n{OID} refs/heads/a\n\n"),
            "# v2 git bundle\nnothex refs/heads/a\n\n".to_string(),
            format!("# v2 git bundle\n{} refs/heads/a\n\n", OID.to_uppercase()),
            format!("# v2 git bundle\n@object-format=sha1\n{OID} refs/heads/a\n\n"),
            format!("# v3 git bundle\n@filter=blob:none\n{OID} refs/heads/a\n\n"),
            "# v2 git bundle\n-../x\n\n".to_string(),
            format!("# v2 git bundle\n{many}\n"),
            huge,
        ];
        for text in &cases {
            let shown: String = text.chars().take(80).collect();
            assert!(matches!(header(text), Err(CloneError::BadBundle(_))), "{shown:?}");
        }
        let bytes = [b"# v2 git bundle\n".as_slice(), OID.as_bytes(), b" refs/heads/\xff\n\n"].concat();
        assert!(matches!(parse_bundle_header(bytes.as_slice()), Err(CloneError::BadBundle(_))));
        // What the guest named is escaped in the message.
        let e = header(&format!("# v2 git bundle\n{OID} refs/heads/\x1b]0;x\x07\n\n")).unwrap_err().to_string();
        assert!(!e.contains('\x1b') && e.contains("\\x1b"), "{e}");
    }

    #[test]
    fn the_copy_from_the_guest_is_bounded() {
        let mut out = Vec::new();
        assert_eq!(copy_bounded(&b"12345"[..], &mut out, Path::new("t"), 5).unwrap(), 5);
        assert_eq!(out, b"12345");
        let mut out = Vec::new();
        assert!(matches!(copy_bounded(&b"123456"[..], &mut out, Path::new("t"), 5), Err(CloneError::TooLarge)));
    }

    #[test]
    fn the_fetch_command_takes_the_bundle_only_into_the_sandboxs_remote() {
        let c = fetch_command(Path::new("/r"), Path::new("/tmp/x.bundle"), "sbx-a");
        let args: Vec<String> = c.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let joined = args.join(" ");
        assert!(joined.starts_with("-C /r -c transfer.fsckObjects=true -c fetch.fsckObjects=true"), "{joined}");
        for flag in ["--no-tags", "--prune", "--no-write-fetch-head", "--recurse-submodules=no", "--no-auto-gc"] {
            assert!(args.iter().any(|a| a == flag), "{flag}: {joined}");
        }
        let n = args.len();
        assert_eq!(&args[n - 3..], ["--", "/tmp/x.bundle", "+refs/heads/*:refs/remotes/sbx-a/*"]);
    }

    #[test]
    fn a_fetch_runs_nothing_of_the_guests_repository_and_leaves_the_host_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let (host, guest) = (dir.path().join("host"), dir.path().join("guest"));
        repo(&host);
        git(dir.path(), &["clone", "-q", host.to_str().unwrap(), guest.to_str().unwrap()]);
        // The guest's repository runs code wherever git reads its config
        // or hooks: none of it may run on the host.
        let marker = dir.path().join("ran");
        let m = marker.display();
        git(&guest, &["config", "core.fsmonitor", &format!("touch {m}")]);
        git(&guest, &["config", "core.hooksPath", "hooks"]);
        fs::create_dir_all(guest.join("hooks")).unwrap();
        for hook in ["reference-transaction", "post-checkout", "post-merge"] {
            fs::write(guest.join("hooks").join(hook), format!("#!/bin/sh\ntouch {m}\n")).unwrap();
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(guest.join("hooks").join(hook), fs::Permissions::from_mode(0o755)).unwrap();
        }
        git(&guest, &["checkout", "-q", "-b", "work"]);
        fs::write(guest.join("g"), "guest\n").unwrap();
        git(&guest, &["add", "g"]);
        git(&guest, &["commit", "-q", "-m", "guest"]);
        let _ = fs::remove_file(&marker);
        let bundle = dir.path().join("out.bundle");
        git(&guest, &["bundle", "create", "--quiet", bundle.to_str().unwrap(), "--branches"]);
        let _ = fs::remove_file(&marker);
        let head_before = fs::read(host.join(".git/HEAD")).unwrap();
        let index_before = fs::read(host.join(".git/index")).unwrap();
        let out = fetch_command(&host, &bundle, "sbx-g").output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(git(&host, &["rev-parse", "refs/remotes/sbx-g/work"]), git(&guest, &["rev-parse", "work"]));
        assert_eq!(git(&host, &["rev-parse", "refs/remotes/sbx-g/main"]), git(&host, &["rev-parse", "main"]));
        assert!(!marker.exists(), "the guest's config or hooks ran on the host");
        assert_eq!(fs::read(host.join(".git/HEAD")).unwrap(), head_before);
        assert_eq!(fs::read(host.join(".git/index")).unwrap(), index_before);
        assert!(!host.join("g").exists() && !host.join(".git/FETCH_HEAD").exists());
        // A branch gone from the guest is pruned from its remote.
        git(&guest, &["checkout", "-q", "main"]);
        git(&guest, &["branch", "-q", "-D", "work"]);
        git(&guest, &["bundle", "create", "--quiet", bundle.to_str().unwrap(), "--branches"]);
        assert!(fetch_command(&host, &bundle, "sbx-g").output().unwrap().status.success());
        assert!(git(&host, &["for-each-ref", "refs/remotes/sbx-g"]).lines().all(|l| !l.contains("work")));
        // A damaged pack fails the fetch and changes no ref.
        git(&guest, &["checkout", "-q", "-b", "later"]);
        fs::write(guest.join("h"), "more\n").unwrap();
        git(&guest, &["add", "h"]);
        git(&guest, &["commit", "-q", "-m", "later"]);
        git(&guest, &["bundle", "create", "--quiet", bundle.to_str().unwrap(), "--branches"]);
        let mut bytes = fs::read(&bundle).unwrap();
        let n = bytes.len();
        bytes.truncate(n - 30);
        fs::write(&bundle, bytes).unwrap();
        assert!(!fetch_command(&host, &bundle, "sbx-g").output().unwrap().status.success());
        assert!(git(&host, &["for-each-ref", "refs/remotes/sbx-g"]).lines().all(|l| !l.contains("later")));
    }

    #[test]
    fn origin_urls_lose_their_credentials_and_local_paths() {
        assert_eq!(guest_origin("https://me:tok@example.com/r.git").as_deref(), Some("https://example.com/r.git"));
        assert_eq!(guest_origin("https://example.com/r.git").as_deref(), Some("https://example.com/r.git"));
        assert_eq!(guest_origin("ssh://git@host:22/r").as_deref(), Some("ssh://host:22/r"));
        assert_eq!(guest_origin("git@github.com:o/r.git").as_deref(), Some("git@github.com:o/r.git"));
        for local in ["/srv/r.git", "../r", "file:///srv/r", ""] {
            assert_eq!(guest_origin(local), None, "{local}");
        }
    }

    fn sandbox_for(home: &Path, ws: &Path) -> Sandbox {
        let settings = sandbox::Settings {
            name: "c".into(),
            agent: "shell".into(),
            workspace: ws.canonicalize().unwrap(),
            created_unix: 1,
        };
        Sandbox::open_or_create(home, settings).unwrap()
    }

    #[test]
    fn prepare_bundles_the_repository_and_refuses_what_cannot_be_cloned() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let ws = dir.path().join("ws");
        repo(&ws);
        git(&ws, &["config", "remote.origin.url", "https://u:p@example.com/r"]);
        git(&ws, &["tag", "v1"]);
        fs::write(ws.join("untracked"), "x").unwrap();
        let sb = sandbox_for(&home, &ws);
        let state = prepare(&sb, "agent").unwrap();
        assert_eq!(state.branch.as_deref(), Some("main"));
        assert_eq!(state.origin.as_deref(), Some("https://example.com/r"));
        assert!(!state.cloned);
        assert_eq!(CloneState::load(sb.dir()).unwrap(), Some(state));
        let bundle = sb.dir().join(IN_BUNDLE);
        let listed = git(dir.path(), &["bundle", "list-heads", bundle.to_str().unwrap()]);
        assert!(listed.contains("refs/heads/main") && listed.contains("refs/tags/v1") && listed.contains("HEAD"));
        // A clone of it has the commits, not the untracked file.
        git(dir.path(), &["clone", "-q", bundle.to_str().unwrap(), "out"]);
        assert!(dir.path().join("out/f").exists() && !dir.path().join("out/untracked").exists());

        // Not a repository's top, no commits, shallow: refused.
        let sub = ws.join("sub");
        fs::create_dir_all(&sub).unwrap();
        let home2 = dir.path().join("home2");
        assert!(matches!(prepare(&sandbox_for(&home2, &sub), "agent"), Err(CloneError::NotARepo(_))));
        let empty = dir.path().join("empty");
        fs::create_dir_all(&empty).unwrap();
        git(&empty, &["init", "-q"]);
        let home3 = dir.path().join("home3");
        assert!(matches!(prepare(&sandbox_for(&home3, &empty), "agent"), Err(CloneError::NoCommits(_))));
        git(&ws, &["commit", "-q", "--allow-empty", "-m", "two"]);
        let shallow = dir.path().join("shallow");
        git(dir.path(), &["clone", "-q", "--depth", "1", &format!("file://{}", ws.display()), "shallow"]);
        let home4 = dir.path().join("home4");
        assert!(matches!(prepare(&sandbox_for(&home4, &shallow), "agent"), Err(CloneError::Shallow(_))));
    }
}

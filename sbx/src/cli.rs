//! Host side: the `sbx` command line's arguments (clap). What each
//! command does lives in `run` (sbx run) and `commands` (the others).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "sbx", version, about = "MicroVM sandboxes for AI coding agents")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run an agent (or a command) in its sandbox, creating it if needed.
    Run(Box<RunArgs>),
    /// Run a command in a running sandbox, beside its first session.
    Exec(ExecArgs),
    /// Copy files or directories between the host and a running sandbox:
    /// `sbx cp NAME:GUEST_PATH HOST_PATH` or `sbx cp HOST_PATH
    /// NAME:GUEST_PATH`. Exit 0 all copied, 1 partly (what was skipped is
    /// said), 2 bad usage, 125 sbx failed.
    Cp(CpArgs),
    /// Fetch the branches of --clone sandbox NAME into the host
    /// repository as refs/remotes/sbx-NAME/* (from a bundle the guest
    /// writes, checked; the working tree, index and HEAD untouched).
    /// Starts the sandbox briefly when it is not running.
    Fetch { name: String },
    /// List sandboxes.
    Ls,
    /// Stop a running sandbox.
    Stop { name: String },
    /// Remove a sandbox and everything it keeps.
    Rm { name: String },
    /// Print a sandbox's console log, or with --audit its audit log:
    /// network requests and file changes (bursts whole, the rest counted),
    /// refusals (also kept in audit-evidence.log: those rotated out of the
    /// log are printed first), after checking both hash chains.
    ///
    /// Printed escaped for the terminal (the guest chose much of it);
    /// --json prints the verified lines exactly as written.
    Log {
        name: String,
        #[arg(long, visible_alias = "network")]
        audit: bool,
        /// With --audit: the verified JSON lines exactly, for programs.
        #[arg(long, requires = "audit")]
        json: bool,
        /// With --audit: keep printing lines as they are appended (across
        /// rotation), each verified against the one before, until Ctrl-C.
        #[arg(long, requires = "audit")]
        follow: bool,
        /// With --follow: stop once the sandbox is not running and every
        /// line is printed.
        #[arg(long, requires = "follow")]
        until_stopped: bool,
    },
    /// Network policy tools.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Requests held for a person (`approval = "ask"`, ask rules): what
    /// waits, in sandbox NAME or in every running sandbox.
    Approvals { name: Option<String> },
    /// Let held question ID of sandbox NAME go ahead.
    Approve(ApproveArgs),
    /// Refuse held question ID of sandbox NAME (the guest gets the deny
    /// answer).
    Reject { name: String, id: u64 },
    /// Secrets netstack puts into the guest's requests to the hosts the
    /// policy binds them to (the guest only ever sees a placeholder).
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Audit trail tools: verify the hash chains, anchor them, export them.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Published ports of sandbox NAME: a guest TCP service reached on the
    /// host's 127.0.0.1:HOSTPORT only (never another address), audited;
    /// live on a running sandbox, kept for its next runs. Without options:
    /// list them.
    Ports(PortsArgs),
}

#[derive(clap::Args)]
pub struct PortsArgs {
    pub name: String,
    /// Publish guest port GUESTPORT on the host's 127.0.0.1:HOSTPORT
    /// (HOSTPORT:GUESTPORT, or 127.0.0.1:HOSTPORT:GUESTPORT).
    #[arg(long, value_name = "HOSTPORT:GUESTPORT", conflicts_with = "unpublish")]
    pub publish: Option<String>,
    /// Stop publishing HOSTPORT (its open connections end).
    #[arg(long, value_name = "HOSTPORT")]
    pub unpublish: Option<u16>,
}

// ---- `sbx audit` (governance: docs/audit.md) ----

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check a sandbox's audit log (its rotated files and evidence file),
    /// or a log FILE, offline: exit 0 intact, 1 broken (the first broken
    /// line: file, line, seq, why), 2 bad input.
    Verify {
        /// A sandbox name, or a log file's path.
        #[arg(value_name = "NAME|FILE")]
        target: String,
        /// Also check the anchors kept for this log in FILE: deleted files,
        /// truncation, rewritten history.
        #[arg(long, value_name = "FILE")]
        anchors: Option<PathBuf>,
    },
    /// Append the sandbox's chain heads (seq and hash of the last line of
    /// its audit log and evidence file, and the time) to FILE, a
    /// hash-chained file outside sbx's state and the workspace. `sbx run`
    /// does this at its end when SBX_AUDIT_ANCHORS names such a file.
    Anchor {
        name: String,
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
    },
    /// Export verified audit events with their sandbox, agent and
    /// workspace: as JSON lines (schema sbx-audit/1) or OCSF-shaped JSON
    /// lines, one file per sandbox in DIR, or all to stdout with '-'.
    Export {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// Every sandbox.
        #[arg(long)]
        all: bool,
        /// jsonl or ocsf.
        #[arg(long, default_value = "jsonl")]
        format: String,
        /// A folder (one file per sandbox), `-` (stdout), or `syslog`: the
        /// system log (`/dev/log`, where journald listens too; RFC 5424,
        /// facility authpriv, one message per record; `syslog:PATH` names
        /// another socket).
        #[arg(long, value_name = "DIR|-|syslog[:PATH]")]
        to: String,
    },
}

#[derive(Subcommand)]
pub enum SecretCommand {
    /// Store secret NAME (read from the terminal without echo, or from
    /// standard input), 0600 in sbx's config folder.
    Set {
        name: String,
        /// Store no value: read it from environment variable VAR at each
        /// `sbx run`.
        #[arg(long, value_name = "VAR")]
        from_env: Option<String>,
        /// Which runs get it: global, workspace[=DIR] (the current folder
        /// without DIR) or sandbox=NAME. For one name the most specific
        /// scope that matches a run wins.
        #[arg(long, default_value = "global")]
        scope: String,
        /// Refuse it to runs after this: an RFC 3339 date or date-time
        /// (2025-01-31, 2025-01-31T12:00:00Z), or 30d, 12h from now.
        #[arg(long, value_name = "DATE|Nd|Nh")]
        expires: Option<String>,
    },
    /// Give secret NAME a new value (read like `set`); the old one is gone
    /// at once. Keeps its scope, and its lifetime's length unless
    /// --expires is given.
    Rotate {
        name: String,
        /// The scope of the secret to rotate.
        #[arg(long, default_value = "global")]
        scope: String,
        /// A new expiry, as for `set`.
        #[arg(long, value_name = "DATE|Nd|Nh")]
        expires: Option<String>,
    },
    /// List secrets: names, scopes, where their values come from, expiry,
    /// last rotation and the hosts they are bound to (never values).
    Ls {
        /// Also show the bindings of this policy file.
        #[arg(long)]
        policy: Option<PathBuf>,
    },
    /// Remove secret NAME (of one scope).
    Rm {
        name: String,
        #[arg(long, default_value = "global")]
        scope: String,
    },
    /// Move an agent's subscription sign-in (claude: ~/.claude/.credentials.json;
    /// codex: ~/.codex/auth.json) into sbx's store as secret AGENT-oauth:
    /// `sbx run AGENT` then gets placeholders, and netstack injects the
    /// access token and performs each refresh on the host.
    OauthImport {
        /// claude or codex.
        agent: String,
        /// The agent's credential file (default: its usual place in your home).
        #[arg(long)]
        from: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
pub struct ApproveArgs {
    pub name: String,
    pub id: u64,
    /// Only what waits now (the default).
    #[arg(long, conflicts_with_all = ["for_", "always"])]
    pub once: bool,
    /// Also allow that host (and the ask rule's methods and path; for a
    /// GraphQL question only the mutations it found) for this long: 90s,
    /// 10m, 2h, 1d.
    #[arg(long = "for", value_name = "DURATION", conflicts_with = "always")]
    pub for_: Option<String>,
    /// Also allow it from now on (kept with the sandbox until
    /// `sbx policy reset`).
    #[arg(long)]
    pub always: bool,
}

/// `sbx policy allow|deny`: a live rule.
#[derive(clap::Args)]
pub struct LiveRuleArgs {
    /// The sandbox.
    pub name: String,
    /// HOST or HOST:PORT (default ports 80 and 443); *.DOMAIN for names
    /// below DOMAIN.
    pub host: String,
    /// Only this method (repeatable; HTTP, or HTTPS netstack terminates).
    #[arg(long = "method", value_name = "M")]
    pub methods: Vec<String>,
    /// Only paths matching this pattern (`*` one segment, `**` any rest).
    #[arg(long)]
    pub path: Option<String>,
    /// Only GraphQL requests with this mutation (repeatable; `name`,
    /// `prefix*`, `*suffix`): an allow needs every mutation of the request
    /// named, a deny any one (or an unreadable body; a deny needs --path).
    #[arg(long = "graphql-mutation", value_name = "NAME")]
    pub graphql_mutations: Vec<String>,
    /// For this long only: 90s, 10m, 2h, 1d.
    #[arg(long = "for", value_name = "DURATION", conflicts_with_all = ["uses", "until_exit"])]
    pub for_: Option<String>,
    /// For this many requests only.
    #[arg(long, conflicts_with = "until_exit")]
    pub uses: Option<u32>,
    /// Until the running sandbox stops (not kept).
    #[arg(long)]
    pub until_exit: bool,
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Allow HOST in sandbox NAME now (running or not; kept with the
    /// sandbox unless --until-exit). Precedence: live deny > the policy
    /// file's deny > live allow > ask rules > the file's allow > default.
    Allow(LiveRuleArgs),
    /// Deny HOST in sandbox NAME now (beats every other rule).
    Deny(LiveRuleArgs),
    /// The rules sandbox NAME runs with: live ones (id, expiry or uses
    /// left, who added them) and, while it runs, the static ones.
    Ls { name: String },
    /// Remove live rule ID of sandbox NAME.
    Rm { name: String, id: u64 },
    /// Remove every live rule of sandbox NAME.
    Reset { name: String },
    /// Policy rules for what sandbox NAME's audit log shows was held,
    /// learned (`sbx run --learn`) or denied by default (TOML to review).
    Suggest { name: String },
    /// Replays sandbox NAME's logged requests through a candidate policy:
    /// what it would decide differently.
    Test {
        name: String,
        /// The candidate policy file (TOML).
        #[arg(long)]
        policy: PathBuf,
    },
    /// Explain whether a URL is allowed: every matching rule, in order.
    Explain {
        url: String,
        /// A policy file (TOML, see netstack/src/policy.rs).
        #[arg(long, conflicts_with = "preset")]
        policy: Option<PathBuf>,
        /// A preset: locked, balanced, open.
        #[arg(long, default_value = "balanced")]
        preset: String,
        /// The HTTP method (plain HTTP only).
        #[arg(long, default_value = "GET")]
        method: String,
        /// Also the live rules of this sandbox.
        #[arg(long, value_name = "NAME")]
        sandbox: Option<String>,
    },
    /// Show the network rules a sandbox runs with (the policy file or the
    /// locked preset, then the agent's own needs) and its credentials.
    Show {
        /// The agent whose needs are added (shell adds none).
        #[arg(long, default_value = "shell")]
        agent: String,
        /// A policy file (TOML), as for `sbx run --policy`.
        #[arg(long)]
        policy: Option<PathBuf>,
    },
    /// What the guest may do with PATH (relative to the shared folder; a
    /// trailing '/' for a directory): hidden, read-only or read-write.
    ExplainFile {
        path: String,
        /// A policy file whose [files] table adds to the defaults.
        #[arg(long)]
        policy: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
pub struct ExecArgs {
    /// The sandbox (see `sbx ls`).
    pub name: String,
    /// Give the command a terminal (default: when stdin and stdout are one).
    #[arg(short = 't', long, conflicts_with = "no_tty")]
    pub tty: bool,
    /// Separate stdin/stdout/stderr pipes even on a terminal.
    #[arg(short = 'T', long)]
    pub no_tty: bool,
    /// Guest user: a name or UID[:GID] (default: root).
    #[arg(short, long, default_value = "")]
    pub user: String,
    /// Working directory in the guest (default: the workspace).
    #[arg(short = 'w', long, default_value = "")]
    pub cwd: String,
    /// Extra environment, KEY=VALUE. Repeatable.
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// How long to wait for a sandbox that is still booting, in seconds.
    #[arg(long, default_value_t = 300)]
    pub wait: u64,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(clap::Args)]
pub struct CpArgs {
    /// NAME:GUEST_PATH or a host path (a host path with ':' starts with ./ or /).
    #[arg(value_parser = clap::value_parser!(std::ffi::OsString))]
    pub source: std::ffi::OsString,
    /// NAME:GUEST_PATH or a host path; an existing directory receives the
    /// source under its own name.
    #[arg(value_parser = clap::value_parser!(std::ffi::OsString))]
    pub dest: std::ffi::OsString,
    /// Copy directories, and everything in them.
    #[arg(short, long)]
    pub recursive: bool,
    /// Replace existing files (a link there is replaced, never followed).
    #[arg(short, long)]
    pub force: bool,
    /// Into the guest: follow symbolic links in the source (default: skip them).
    #[arg(short = 'L', long)]
    pub dereference: bool,
    /// Print each name copied.
    #[arg(short, long)]
    pub verbose: bool,
    /// Guest user the guest's tar runs as: a name or UID[:GID].
    #[arg(short, long, default_value = "agent")]
    pub user: String,
    /// Copy at most SIZE bytes of file data in all (e.g. 500M, 10G); past
    /// it the copy stops, keeping what came.
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = crate::limits::parse_size)]
    pub max_size: u64,
    /// How long to wait for a sandbox that is still booting, in seconds.
    #[arg(long, default_value_t = 300)]
    pub wait: u64,
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// The agent (the list is built from agents/presets.toml).
    #[arg(help = crate::agents::run_help())]
    pub agent: String,
    /// Sandbox name (default: AGENT-FOLDER).
    #[arg(long)]
    pub name: Option<String>,
    /// The project folder (default: the current directory).
    #[arg(long)]
    pub workspace: Option<PathBuf>,
    /// Guest memory in MiB (default: the agent's, 128 for shell, 1024 for
    /// the agents, which run Node.js or large native executables). Boot
    /// time grows with it (the guest kernel initialises every page).
    #[arg(long)]
    pub memory: Option<u64>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u8,
    /// CPU template: host, portable, or auto (portable where the host's KVM
    /// is kvm_pvm, host otherwise).
    #[arg(long, default_value = "auto")]
    pub cpu_template: String,
    /// Stop the VM after this many seconds.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Do not treat the terminal as interactive even if there is one.
    #[arg(long)]
    pub no_tty: bool,
    /// Guest user to run as: a name or UID[:GID].
    #[arg(short, long, default_value = "agent")]
    pub user: String,
    /// Extra environment for the program, KEY=VALUE. Repeatable. (API
    /// keys need none of this: see `sbx secret`.)
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Copy the guest kernel console to stderr.
    #[arg(long)]
    pub console: bool,
    /// Publish guest port GUESTPORT on the host's 127.0.0.1:HOSTPORT
    /// (loopback only; kept with the sandbox, see `sbx ports`). Repeatable.
    #[arg(short = 'p', long = "publish", value_name = "HOSTPORT:GUESTPORT")]
    pub publish: Vec<String>,
    /// Let the guest kernel log everything (slower boot).
    #[arg(long)]
    pub kernel_log: bool,
    /// Kernel image (default: the one `cargo xtask kernel` built).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Image directory with init.cpio and rootfs.ext4 (default: the one
    /// `cargo xtask image` built for AGENT).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Size in GiB of the sandbox's own disk (sparse; used when the
    /// sandbox is created).
    #[arg(long, default_value_t = 16)]
    pub disk_size: u64,
    /// Limit the sandbox to this many cores' worth of CPU time (e.g. 1.5;
    /// all its vCPUs and its VMM's threads together; cgroup v2 cpu.max).
    #[arg(long, value_name = "CORES", allow_negative_numbers = true, value_parser = crate::limits::parse_cpu_limit)]
    pub cpu_limit: Option<f64>,
    /// Limit the sandbox's VMM to N threads and processes (cgroup v2
    /// pids.max; at least 64).
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = crate::limits::parse_pids_limit)]
    pub pids_limit: Option<u64>,
    /// Refuse guest writes that would grow the shared folders by more
    /// than SIZE in all during the run (e.g. 500M, 10G): the guest gets
    /// "Disk quota exceeded". Every file, directory and link the guest
    /// makes counts 4 KiB (a link its target too), git shadows included.
    /// Removing or shrinking gives room back; a file deleted while open
    /// counts until it is closed.
    #[arg(long, value_name = "SIZE", allow_negative_numbers = true, value_parser = crate::limits::parse_size)]
    pub workspace_quota: Option<u64>,
    /// Extra kernel command line arguments.
    #[arg(long, default_value = "")]
    pub kernel_args: String,
    /// Write boot figures as JSON to this file.
    #[arg(long, hide = true)]
    pub report: Option<PathBuf>,
    /// Sample the guest's instruction pointer every 5 ms and write a
    /// histogram by kernel function to this file (a boot profiler).
    #[arg(long, hide = true)]
    pub profile: Option<PathBuf>,
    /// What happens to a request no rule allows: deny (default), or ask
    /// (held for `sbx approve`; overrides the policy file's `approval`).
    #[arg(long, value_name = "ask|deny")]
    pub approval: Option<String>,
    /// Learn: every request that would be held (or denied by default)
    /// goes ahead at once, until the run ends, and is recorded in the
    /// audit log for `sbx policy suggest`. Deny rules still deny.
    #[arg(long)]
    pub learn: bool,
    /// How long a held request waits for an answer, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub approval_wait: u64,
    /// Network policy file (TOML, see netstack/src/policy.rs). Default:
    /// deny everything but what the agent needs.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Also allow HOST (or *.DOMAIN) on ports 80 and 443. Repeatable.
    #[arg(long, value_name = "HOST")]
    pub allow: Vec<String>,
    /// Send connections to NAME:PORT to the host address ADDR:APORT instead
    /// of what the host's resolver says, like curl's --resolve (for local
    /// services and tests). The policy still decides. Repeatable.
    #[arg(long, value_name = "NAME:PORT:ADDR:APORT")]
    pub resolve: Vec<String>,
    /// No network device at all.
    #[arg(long)]
    pub no_network: bool,
    /// Also trust the CA certificates in FILE (PEM) when netstack
    /// verifies an upstream it terminates TLS for (local test servers).
    #[arg(long, value_name = "FILE")]
    pub upstream_ca: Option<PathBuf>,
    /// Put secret NAME's real value into the guest's environment instead
    /// of a placeholder: the agent can then read it and leak it.
    /// Repeatable.
    #[arg(long, value_name = "NAME")]
    pub expose_secret_to_guest: Vec<String>,
    /// Give the sandbox its own git clone of the workspace's repository
    /// on its own disk, at the workspace's path, instead of sharing the
    /// folder (committed history only: untracked and ignored files are
    /// not copied). Only for a new sandbox; kept for its later runs.
    /// Bring its branches back with `sbx fetch NAME`.
    #[arg(long)]
    pub clone: bool,
    /// Also share the host folder DIR at the same path, read-only (`:ro`,
    /// the default) or read-write (`:rw`), under the same file policy.
    /// Repeatable.
    #[arg(long, value_name = "DIR[:ro|:rw]")]
    pub mount: Vec<String>,
    /// The command to run instead of the agent.
    #[arg(last = true)]
    pub command: Vec<String>,
}

//! Host side: steering a running sandbox's network — live rules, held
//! requests a person approves, time-boxed grants, and the one decision
//! function that the stack and `sbx policy explain` both use ([`judge`]).
//! Everything here is a pure function of validated inputs and a clock the
//! caller gives (milliseconds; the stack's own, so tests use a fake one);
//! the guest never reaches this module, only the decisions it makes.
//!
//! # Live rules
//!
//! `sbx policy allow|deny NAME HOST[:PORT] [--method M] [--path P]
//! [--graphql-mutation NAME] [--for 10m | --uses N | --until-exit]` adds
//! a [`LiveRule`]; `sbx policy
//! rm NAME ID` and `sbx policy reset NAME` take them away. A running
//! sandbox gets them through its admin socket (sbx's `admin` module) and
//! sees a change at its next decision: each HTTP request (plain, or inside
//! TLS netstack terminates) is judged on its own, so the next request on a
//! kept-alive connection sees it; a spliced HTTPS connection is judged
//! once, at its ClientHello, and keeps that decision while it lasts (as a
//! DNS answer does for its TTL). Live rules are kept with the sandbox
//! (`live-policy.json`, [`LiveRules::to_json`], read back with the checks
//! of user input, at most [`MAX_LIVE_RULES`]) until reset; `--until-exit`
//! rules are not kept. A grant `--for` a time or for a number of `--uses`
//! ends by itself: the next request is judged without it (denied again,
//! unless another rule allows it), and the end is logged.
//!
//! # Precedence
//!
//! admin deny > live deny > static deny > admin ask > live allow >
//! static ask > static allow > default (held if `approval = "ask"`, else
//! denied). A live allow thus lifts an ask rule of the sandbox's own
//! policy (that is how "approve for 10 minutes" works) but never a deny of
//! the policy file; a live deny beats everything the user set.
//!
//! The admin layer ([`AdminLayer`]: the machine's `/etc/sbx/policy.toml`,
//! read by sbx, kept with the live rules but never persisted with them,
//! replaced whole by [`Live::set_admin`] when the file changes) is above
//! all of it: its deny rules beat every allow of any kind, and its ask
//! rules hold a request even when a live allow (`sbx policy allow`, `sbx
//! approve --for|--always`, `--learn`) or the user's file allows it.
//! `sbx approve` of a question an admin ask rule raised lets only what
//! waits go (as `--once`: no grant is added, it would not lift the rule),
//! and `--learn` never answers such a question.
//!
//! # Ask rules and held requests
//!
//! ```toml
//! approval = "ask"                 # default "deny": today's behaviour
//! include = ["ask:github", "ask:gitlab"]   # the shipped ask presets
//!
//! [[rule]]
//! ask = "api.github.com"           # held for a person's yes, even if allowed
//! methods = ["PUT"]
//! path = "/repos/*/*/pulls/*/merge"
//! ```
//!
//! With `approval = "ask"` (or `sbx run --approval ask`), a request the
//! policy does not allow, to a host no deny rule names, is held: its name
//! resolves (a synthetic address, as for allowed names), the guest's TCP
//! connection stays open, nothing goes upstream, for up to [`DEFAULT_HOLD`]
//! (or the time given). An ask rule holds the requests it matches the
//! same way, even to an allowed host. Requests to the same host and port
//! (and ask rule, and for a GraphQL ask rule the same listed mutations:
//! [`QKey::mutations`]) wait on one [`Question`]; `sbx approvals` lists them,
//! `sbx approve NAME ID [--once | --for 10m | --always]` lets them go
//! (as if allowed: the upstream connection is made then) and `sbx reject
//! NAME ID` refuses them (the deny answer: a 403, or a reset for spliced
//! TLS), as does the time-out. `--once` lets go what waits now (and the
//! further requests of the same kind on those connections), remembering
//! nothing; `--for` adds a live allow grant for that long, `--always` one
//! kept with the sandbox — for the host and port, narrowed to the ask
//! rule's methods and path when an ask rule asked (and, for a GraphQL ask
//! rule, to the mutations the question found: see below). Bounded:
//! [`MAX_QUESTIONS`] questions and [`MAX_HELD_CONNS`] held connections
//! per sandbox; past that, a request that would be held is denied.
//!
//! `sbx run --learn` answers every new question yes at once (a live allow
//! until the run ends, never kept) and logs it as `"answer":"learned"`;
//! `sbx policy suggest` turns such lines (and held or default-denied
//! ones) into rules to review, `sbx policy test` replays the logged
//! requests through a candidate policy with [`judge`].
//!
//! Where method and path cannot be read (HTTPS spliced by SNI because
//! netstack has no CA), an ask rule that names the host and port holds the
//! whole connection (fail closed). Hosts with ask rules, or live rules
//! with methods or a path, are terminated like hosts with method rules.
//!
//! # Path patterns
//!
//! `path` (ask rules, live rules) is matched on the request's normalised
//! path ([`crate::http::normalize_path`]) segment by segment: `*` is
//! exactly one non-empty segment, `**` (at most once, usually trailing:
//! `/repos/*/*/git/refs/**`) any number of segments including none, any
//! other segment is compared literally (given normalised; `%XX` of
//! unreserved characters decoded). One trailing `/` of the request is
//! ignored. For ask and deny rules literal segments compare without regard
//! to case and a path that cannot be normalised matches (fail closed: it is
//! held or denied); for allow rules case matters and such a path never
//! matches. A pattern may end in `?KEY=VALUE`: then one of the query's
//! `&`-separated pairs, `%`-decoded (`+` as space), must be that pair
//! (`GET /**/info/refs?service=git-receive-pack`, git push's first step).
//!
//! Writing an ask preset: a list of [`AskRule`]s in [`ask_preset`]; each is
//! a host pattern, ports (default 80, 443), methods (none: every method)
//! and a path pattern. Cover the upstream's aliases (GitHub's API also
//! takes `/repositories/ID/...`).
//!
//! # GraphQL mutations
//!
//! GitHub's and GitLab's GraphQL APIs do what their REST rows ask about
//! (`gh pr merge` is the mutation `mergePullRequest`), at one path that
//! reads use too (`gh pr list`). An ask rule with `graphql_mutations`
//! holds only the GraphQL requests with a listed mutation among their
//! operations' first-level fields ([`crate::graphql`]):
//!
//! ```toml
//! [[rule]]
//! ask = "api.github.com"
//! methods = ["POST"]
//! path = "/graphql"
//! graphql_mutations = ["mergePullRequest", "delete*"]   # or ["*"]: every mutation
//! ```
//!
//! A name is exact, `prefix*`, `*suffix` or `*`, compared without regard
//! to case. A body that cannot be read with certainty (not JSON, no
//! `query` string, invalid GraphQL, a fragment spread among a mutation's
//! fields, chunked, `Content-Encoding`, over [`graphql::MAX_BODY`]) is held
//! as if it were listed (fail closed). If any operation of a document or
//! batch is a listed mutation the request is held, whatever
//! `operationName` picks. A GET (or HEAD) is judged by its `query=`
//! parameter (`%`-decoded; no body is allowed on them), a POST by its body
//! and any `query=` parameter. For such a request the stack waits,
//! unread, for the whole body in its inbox (Content-Length up to
//! [`graphql::MAX_BODY`], bounded in time as a slow request head is) and
//! then judges it with [`judge_body`]; requests no GraphQL ask rule's
//! host, port, methods and path match are judged on their head as
//! before, with nothing buffered. [`judge`] without a body (`sbx policy
//! explain`, `sbx policy test`) reports such a request as held "if its
//! body is one of its GraphQL mutations" ([`Judgement::needs_body`]). The
//! question shows the mutations found ([`Question::detail`], "mutation
//! mergePullRequest"). An approval `--for`/`--always` grants only those
//! mutations ([`Question::mutations`]: the listed first-level fields of
//! the first request, at most [`MAX_GRANT_MUTATIONS`]) at the rule's
//! host, port, methods and path: a live allow scoped to GraphQL mutations
//! ([`LiveRule::graphql`], shown as "graphql mutation createIssue on
//! api.github.com:443/graphql" by `sbx approve`, in `sbx policy ls` and
//! in the audit line's `scope`). Approving `createIssue` for 10 minutes
//! thus lets later `createIssue` requests go (alone, or beside mutations
//! no ask rule lists: the rule that asked is lifted), while
//! `deleteRepository`, or `createIssue` beside `deleteRepository`, is
//! still asked; reads are judged as before. Field names are compared with
//! case for a grant (the ask rule compares without: `createissue` asks
//! again). A request whose mutations are not all known (an unreadable
//! body, a fragment among a mutation's fields) is never covered by such a
//! grant, and a question about one gets no lasting grant at all: `sbx
//! approve --for|--always` lets only what waits go, and says so. Grants
//! recorded before this scoping (in `live-policy.json`, without
//! `graphql_mutations`) keep the whole path they were made for.
//!
//! The same scope is given by hand with `sbx policy allow|deny NAME HOST
//! --path /graphql --graphql-mutation NAME` (repeatable; `prefix*`,
//! `*suffix` as in ask rules). A scoped allow matches a request only if
//! every mutation field of it is named (and known); a scoped deny matches
//! one with any named mutation (without regard to case), or whose
//! mutations cannot be read (fail closed; so a scoped deny needs a
//! `--path`, or it would deny every non-GraphQL POST of the host). A
//! live deny of a mutation does not deny the host: reads and other
//! mutations still go (deny the host with a plain `sbx policy deny NAME
//! HOST`). `sbx reject` answers only what waits, as before (no lasting
//! deny is made from a question). Until the body is read, a request a
//! scoped rule might decide is marked [`Judgement::needs_body`] and the
//! stack waits for its body, as for GraphQL ask rules.
//!
//! The shipped GraphQL rows (on POST and GET; each named like the REST
//! rows, "ask:github graphql merge"):
//!
//! | preset | path | what | mutations |
//! |---|---|---|---|
//! | ask:github | api.github.com `/graphql` | merge | mergePullRequest, mergeBranch, enablePullRequestAutoMerge, enqueuePullRequest |
//! | | | delete | `delete*` |
//! | | | branch/ref change | createRef, updateRef, updateRefs, createCommitOnBranch, updatePullRequestBranch |
//! | | | branch change | createBranchProtectionRule, updateBranchProtectionRule, createRepositoryRuleset, updateRepositoryRuleset |
//! | | | permission change | updateTeamsRepository, removeOutsideCollaborator, addEnterpriseAdmin, inviteEnterpriseAdmin, removeEnterpriseAdmin, updateEnterpriseAdministratorRole |
//! | | | organisation change | `updateOrganization*`, `updateEnterprise*` |
//! | | | repository settings | updateRepository, archiveRepository, unarchiveRepository, transferRepository, updateRepositoryWebCommitSignoffSetting, updateEnvironment |
//! | ask:gitlab | gitlab.com `/api/graphql` | merge | mergeRequestAccept |
//! | | | delete | `destroy*`, `*Delete`, `*Destroy` |
//! | | | branch change | commitCreate, branchCreate, `branchRule*` |
//! | | | permission change | `projectMember*`, `groupMember*` |
//! | | | project settings | projectSetLocked, projectSettingsUpdate, projectCiCdSettingsUpdate, ciCdSettingsUpdate |
//!
//! These lists are what is high-impact today, not every mutation the
//! APIs have or will have: for a strict setup add a rule with
//! `graphql_mutations = ["*"]` (every mutation asks, reads do not).

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use thiserror::Error;

use crate::graphql::{self, NamePattern};
use crate::host::HostName;
use crate::http;
use crate::policy::{Action, AdminLayer, Pattern, Policy, Request, ADMIN_ASK_ORIGIN};

/// Live rules one sandbox may have.
pub const MAX_LIVE_RULES: usize = 10_000;
/// Bytes of a persisted live-rule file read back.
pub const MAX_LIVE_FILE: usize = 8 << 20;
/// Questions (distinct held host:port:rule) waiting at once per sandbox.
pub const MAX_QUESTIONS: usize = 64;
/// Guest connections held at once per sandbox.
pub const MAX_HELD_CONNS: usize = 256;
/// How long a held request waits for an answer by default.
pub const DEFAULT_HOLD_MS: u64 = 60_000;
/// [`DEFAULT_HOLD_MS`] as a duration, for the docs.
pub const DEFAULT_HOLD: std::time::Duration = std::time::Duration::from_millis(DEFAULT_HOLD_MS);
/// Longest path pattern, in bytes.
pub const MAX_PATH_PATTERN: usize = 1024;
/// Most methods on one rule.
pub const MAX_METHODS: usize = 16;
/// Longest grant (`--for`), in seconds: a year.
pub const MAX_GRANT_SECS: u64 = 366 * 24 * 3600;
/// Most uses of a `--uses` grant.
pub const MAX_USES: u32 = 1_000_000;
/// Most mutation names a live rule is scoped to (`--graphql-mutation`, or
/// those a question found): a question with more gets no lasting grant.
pub const MAX_GRANT_MUTATIONS: usize = 32;
/// Resolved questions kept for `sbx approvals` to show what happened.
const KEEP_ANSWERED: usize = 32;
/// Audit events queued before the stack takes them (more are counted).
const MAX_QUEUED_EVENTS: usize = 4096;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    #[error("bad host '{0}': {1} (give a name such as api.example.com or *.example.com, never an IP address)")]
    Host(String, String),
    #[error("bad port in '{0}' (give HOST or HOST:PORT with a port from 1 to 65535)")]
    Port(String),
    #[error("bad method '{0}' (upper-case letters only, such as GET or POST; at most {MAX_METHODS})")]
    Method(String),
    #[error("bad path pattern '{0}': {1}")]
    Path(String, String),
    #[error("give exactly one of --for, --uses, --until-exit (or none: until reset)")]
    Limit,
    #[error("--for must be from 1 s to {MAX_GRANT_SECS} s, --uses from 1 to {MAX_USES}")]
    LimitRange,
    #[error("bad action '{0}' (allow or deny)")]
    Action(String),
    #[error("too many live rules (at most {MAX_LIVE_RULES}): remove some with `sbx policy rm` or `sbx policy reset`")]
    TooMany,
    #[error("no live rule #{0} (see `sbx policy ls`)")]
    NoRule(u64),
    #[error("no question #{0} waits (see `sbx approvals`)")]
    NoQuestion(u64),
    #[error("question #{0} was already answered")]
    Answered(u64),
    #[error("the live-rule file is not valid: {0} (remove it with `sbx policy reset`)")]
    File(String),
    #[error("the live-rule file is {0} bytes, more than {MAX_LIVE_FILE} (remove it with `sbx policy reset`)")]
    FileSize(usize),
    #[error("{0}")]
    Graphql(String),
}

// ---------------------------------------------------------------- paths

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    /// `*`: one non-empty segment.
    One,
    /// `**`: any number of segments.
    Rest,
    Lit(String),
}

/// A path pattern (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    raw: String,
    segs: Vec<Seg>,
    query: Option<(String, String)>,
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

impl PathPattern {
    pub fn parse(raw: &str) -> Result<PathPattern, Error> {
        let bad = |why: &str| Error::Path(raw.chars().take(80).collect(), why.to_string());
        if raw.len() > MAX_PATH_PATTERN {
            return Err(bad("too long"));
        }
        if !raw.starts_with('/') {
            return Err(bad("it must start with '/'"));
        }
        if raw.contains('#') || raw.bytes().any(|b| b.is_ascii_control() || b == b' ' || b >= 0x80) {
            return Err(bad("no '#', spaces, controls or non-ASCII"));
        }
        let (path, query) = match raw.split_once('?') {
            Some((p, q)) => {
                let (k, v) = q.split_once('=').ok_or_else(|| bad("the query must be ?KEY=VALUE"))?;
                if k.is_empty() || !k.bytes().chain(v.bytes()).all(unreserved) {
                    return Err(bad("the query must be ?KEY=VALUE of letters, digits, '-', '.', '_', '~'"));
                }
                (p, Some((k.to_string(), v.to_string())))
            }
            None => (raw, None),
        };
        let mut segs = Vec::new();
        if path != "/" {
            for s in path[1..].split('/') {
                let seg = match s {
                    "" => return Err(bad("empty segment (no '//', and no trailing '/': use /** for any rest)")),
                    "*" => Seg::One,
                    "**" if segs.contains(&Seg::Rest) => return Err(bad("'**' may appear once")),
                    "**" => Seg::Rest,
                    s if s.contains('*') => return Err(bad("'*' must be a whole segment")),
                    s => match http::normalize_path(&format!("/{s}")) {
                        Ok(n) if n.len() > 1 && !n[1..].contains('/') => Seg::Lit(n[1..].to_string()),
                        Ok(_) => return Err(bad("'.' and '..' are not segments")),
                        Err(e) => return Err(bad(&e.to_string())),
                    },
                };
                segs.push(seg);
            }
        }
        Ok(PathPattern { raw: raw.to_string(), segs, query })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// Whether `target` (as sent, or normalised) matches. `strict`: the
    /// rule fails closed (ask, deny) — literal segments without regard to
    /// case, and a target that cannot be normalised or decoded matches.
    pub fn matches(&self, target: &str, strict: bool) -> bool {
        let Ok(path) = http::normalize_path(target) else { return strict };
        let trimmed = if path.len() > 1 { path.strip_suffix('/').unwrap_or(&path) } else { &path };
        let parts: Vec<&str> = if trimmed == "/" { vec![] } else { trimmed[1..].split('/').collect() };
        if !segs_match(&self.segs, &parts, strict) {
            return false;
        }
        let Some((key, value)) = &self.query else { return true };
        let Some(q) = target.split_once('?').map(|(_, q)| q.split('#').next().unwrap_or("")) else { return false };
        q.split('&').any(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match (form_decode(k), form_decode(v)) {
                (Some(k), Some(v)) if strict => k.eq_ignore_ascii_case(key) && v.eq_ignore_ascii_case(value),
                (Some(k), Some(v)) => k == *key && v == *value,
                _ => strict,
            }
        })
    }
}

fn segs_match(pattern: &[Seg], parts: &[&str], strict: bool) -> bool {
    match pattern.split_first() {
        None => parts.is_empty(),
        // At most one `**`: trying each split point is linear.
        Some((Seg::Rest, rest)) => (0..=parts.len()).any(|i| segs_match(rest, &parts[i..], strict)),
        Some((seg, rest)) => {
            let Some((part, more)) = parts.split_first() else { return false };
            let here = match seg {
                Seg::One => !part.is_empty(),
                Seg::Lit(l) if strict => l.eq_ignore_ascii_case(part),
                Seg::Lit(l) => l == part,
                Seg::Rest => false,
            };
            here && segs_match(rest, more, strict)
        }
    }
}

/// `%XX` and `+` decoded; None if an escape is bad or the result not UTF-8.
fn form_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// `text` with everything but printable ASCII replaced by `?` (the path
/// is the guest's).
fn printable(text: &str) -> String {
    text.chars().map(|c| if (' '..='~').contains(&c) { c } else { '?' }).collect()
}

fn check_methods(methods: &[String]) -> Result<(), Error> {
    if methods.len() > MAX_METHODS {
        return Err(Error::Method(format!("{} methods", methods.len())));
    }
    for m in methods {
        if m.is_empty() || m.len() > 32 || !m.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(Error::Method(m.chars().take(40).collect()));
        }
    }
    Ok(())
}

/// Whether a rule narrowed by `methods` and `path` matches `req`; `strict`
/// as in [`PathPattern::matches`]. Where method and path cannot be read
/// (spliced HTTPS), a narrowed strict rule matches and a narrowed other
/// rule does not (fail closed both ways).
fn narrowed_matches(methods: &[String], path: Option<&PathPattern>, req: &Request<'_>, strict: bool) -> bool {
    let narrowed = !methods.is_empty() || path.is_some();
    match req.http {
        Some((method, target)) => {
            (methods.is_empty() || methods.iter().any(|m| m == method))
                && path.is_none_or(|p| p.matches(target, strict))
        }
        None => !narrowed || strict,
    }
}

fn ports_text(ports: &[u16]) -> String {
    ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
}

/// The mutation fields of a request (its target's `query=` parameter, and
/// its body unless GET or HEAD): None if the body is needed and was not
/// given, Some(None) if they are not all known (unreadable, a fragment).
fn request_mutations(method: &str, target: &str, body: Option<&graphql::Scan>) -> Option<Option<Vec<String>>> {
    let mut all = match graphql::scan_target(target) {
        Some(scan) => match graphql::known_mutations(&scan) {
            Some(v) => v,
            None => return Some(None),
        },
        None => Vec::new(),
    };
    if method != "GET" && method != "HEAD" {
        match graphql::known_mutations(body?) {
            Some(v) => {
                let seen: std::collections::HashSet<String> = all.iter().cloned().collect();
                all.extend(v.into_iter().filter(|f| !seen.contains(f)));
            }
            None => return Some(None),
        }
    }
    Some(Some(all))
}

// ------------------------------------------------------------ ask rules

/// Where requests wait for a person (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Approval {
    /// Not allowed is denied (today's behaviour).
    #[default]
    Deny,
    /// Not allowed, and not denied by a rule, is held for a person.
    Ask,
}

impl Approval {
    pub fn parse(s: &str) -> Option<Approval> {
        match s {
            "deny" => Some(Approval::Deny),
            "ask" => Some(Approval::Ask),
            _ => None,
        }
    }
}

/// A rule that holds the requests it matches for a person's yes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AskRule {
    pub pattern: Pattern,
    pub ports: Vec<u16>,
    pub methods: Vec<String>,
    pub path: Option<PathPattern>,
    /// "rule 4", "ask:github merge".
    pub origin: String,
    /// `graphql_mutations`: the rule holds only GraphQL requests with one
    /// of these mutations (or that cannot be read) — see [`crate::graphql`].
    pub graphql: Option<Vec<NamePattern>>,
}

impl fmt::Display for AskRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ask {} ports {}", self.origin, self.pattern, ports_text(&self.ports))?;
        if !self.methods.is_empty() {
            write!(f, " methods {}", self.methods.join(","))?;
        }
        if let Some(p) = &self.path {
            write!(f, " path {}", p.as_str())?;
        }
        if let Some(names) = &self.graphql {
            let names: Vec<&str> = names.iter().map(NamePattern::as_str).collect();
            write!(f, " graphql mutations {}", names.join(","))?;
        }
        Ok(())
    }
}

/// What a GraphQL ask rule makes of a request that matches its host, port,
/// methods and path.
enum GraphqlAsk {
    /// Not a GraphQL rule (or the request is unreadable spliced TLS): held.
    Plain,
    /// Held: these listed mutations, or what could not be read; and the
    /// listed fields, where all are known (what a grant may be scoped to).
    Asked(String, Option<Vec<String>>),
    /// No listed mutation: the rule does not hold it.
    NotListed,
    /// The body decides and was not given.
    Unread,
}

impl AskRule {
    /// The same rule, holding only GraphQL requests with one of `names`
    /// among their mutations ([`NamePattern`]; at most
    /// [`graphql::MAX_PATTERNS`]).
    pub fn with_graphql(mut self, names: &[String]) -> Result<AskRule, Error> {
        if names.is_empty() || names.len() > graphql::MAX_PATTERNS {
            return Err(Error::Graphql(format!(
                "graphql_mutations needs from 1 to {} names (\"*\" for every mutation)",
                graphql::MAX_PATTERNS
            )));
        }
        let names = names.iter().map(|n| NamePattern::parse(n)).collect::<Result<Vec<_>, _>>();
        self.graphql = Some(names.map_err(Error::Graphql)?);
        Ok(self)
    }

    /// For a request this rule's host, port, methods and path match: a
    /// listed mutation in the `query=` parameter of its target, or (not
    /// GET or HEAD, which carry no body) in `body`.
    fn graphql_asked(&self, req: &Request<'_>, body: Option<&graphql::Scan>) -> GraphqlAsk {
        let (Some(names), Some((method, target))) = (&self.graphql, req.http) else { return GraphqlAsk::Plain };
        // The listed fields of the whole request (target and body), if all
        // are known and few enough to scope a grant to.
        let listed = || {
            let all = request_mutations(method, target, body)??;
            let listed: Vec<String> = all.into_iter().filter(|f| names.iter().any(|n| n.matches(f))).collect();
            (!listed.is_empty() && listed.len() <= MAX_GRANT_MUTATIONS).then_some(listed)
        };
        if let Some(why) = graphql::scan_target(target).and_then(|s| graphql::asked(&s, names)) {
            return GraphqlAsk::Asked(why, listed());
        }
        if method == "GET" || method == "HEAD" {
            return GraphqlAsk::NotListed;
        }
        match body.map(|b| graphql::asked(b, names)) {
            None => GraphqlAsk::Unread,
            Some(Some(why)) => GraphqlAsk::Asked(why, listed()),
            Some(None) => GraphqlAsk::NotListed,
        }
    }

    /// An ask rule as the policy file gives it (`ports` None: 80 and 443).
    pub fn parse(
        host: &str,
        ports: Option<Vec<u16>>,
        methods: Vec<String>,
        path: Option<&str>,
        origin: String,
    ) -> Result<AskRule, Error> {
        let pattern = Pattern::parse(host).map_err(|e| Error::Host(host.to_string(), e.to_string()))?;
        let ports = ports.unwrap_or_else(|| vec![80, 443]);
        if ports.is_empty() || ports.contains(&0) {
            return Err(Error::Port(host.to_string()));
        }
        check_methods(&methods)?;
        let path = path.map(PathPattern::parse).transpose()?;
        Ok(AskRule { pattern, ports, methods, path, origin, graphql: None })
    }

    fn matches(&self, req: &Request<'_>) -> bool {
        self.pattern.matches(req.host)
            && self.ports.contains(&req.port)
            && narrowed_matches(&self.methods, self.path.as_ref(), req, true)
    }

    /// Whether it is a rule of the machine's admin policy (which no live
    /// allow lifts and `--learn` never answers).
    pub fn is_admin(&self) -> bool {
        self.origin.starts_with(ADMIN_ASK_ORIGIN)
    }
}

/// The shipped ask presets, by name (`include = ["ask:github"]`).
pub const ASK_PRESETS: &[&str] = &["github", "gitlab"];

/// (hosts, methods, path, what) of each shipped ask rule.
type PresetRow = (&'static [&'static str], &'static [&'static str], &'static str, &'static str);

const GITHUB: &[PresetRow] = &[
    (&["api.github.com"], &["PUT"], "/repos/*/*/pulls/*/merge", "merge"),
    (&["api.github.com"], &["PUT", "POST", "DELETE"], "/repos/*/*/pulls/*/merge/**", "merge"),
    (&["api.github.com", "github.com", "uploads.github.com"], &["DELETE"], "/**", "delete"),
    (&["api.github.com"], &["POST"], "/repos/*/*/git/refs", "branch/ref change"),
    (&["api.github.com"], &["PATCH", "DELETE", "PUT", "POST"], "/repos/*/*/git/refs/**", "branch/ref change"),
    (&["api.github.com"], &["POST", "PUT", "PATCH"], "/repos/*/*/branches/**", "branch change"),
    (&["api.github.com"], &["PUT", "PATCH", "POST"], "/repos/*/*/collaborators/**", "permission change"),
    (&["api.github.com"], &["PUT", "PATCH", "POST"], "/orgs/**", "organisation change"),
    (&["api.github.com"], &["PATCH", "PUT"], "/repos/*/*", "repository settings"),
    (&["github.com"], &["POST"], "/**/git-receive-pack", "git push"),
    (&["github.com"], &[], "/**/info/refs?service=git-receive-pack", "git push"),
];

const GITLAB: &[PresetRow] = &[
    (&["gitlab.com"], &["PUT", "POST"], "/api/v4/projects/*/merge_requests/*/merge", "merge"),
    (&["gitlab.com"], &["DELETE"], "/**", "delete"),
    (&["gitlab.com"], &["POST", "PUT"], "/api/v4/projects/*/repository/branches/**", "branch change"),
    (&["gitlab.com"], &["POST"], "/api/v4/projects/*/repository/branches", "branch change"),
    (&["gitlab.com"], &["POST", "PUT", "PATCH"], "/api/v4/projects/*/protected_branches/**", "branch change"),
    (&["gitlab.com"], &["POST", "PUT"], "/api/v4/projects/*/members/**", "permission change"),
    (&["gitlab.com"], &["POST", "PUT"], "/api/v4/groups/*/members/**", "permission change"),
    (&["gitlab.com"], &["PUT"], "/api/v4/projects/*", "project settings"),
    (&["gitlab.com"], &["POST"], "/**/git-receive-pack", "git push"),
    (&["gitlab.com"], &[], "/**/info/refs?service=git-receive-pack", "git push"),
];

/// (hosts, path, GraphQL mutations, what) of each shipped GraphQL ask
/// rule; each asks on POST (the body) and GET (the `query=` parameter).
type GraphqlRow = (&'static [&'static str], &'static str, &'static [&'static str], &'static str);

const GRAPHQL_METHODS: &[&str] = &["POST", "GET"];

const GITHUB_GRAPHQL: &[GraphqlRow] = &[
    (
        &["api.github.com"],
        "/graphql",
        &["mergePullRequest", "mergeBranch", "enablePullRequestAutoMerge", "enqueuePullRequest"],
        "merge",
    ),
    (&["api.github.com"], "/graphql", &["delete*"], "delete"),
    (
        &["api.github.com"],
        "/graphql",
        &["createRef", "updateRef", "updateRefs", "createCommitOnBranch", "updatePullRequestBranch"],
        "branch/ref change",
    ),
    (
        &["api.github.com"],
        "/graphql",
        &[
            "createBranchProtectionRule",
            "updateBranchProtectionRule",
            "createRepositoryRuleset",
            "updateRepositoryRuleset",
        ],
        "branch change",
    ),
    (
        &["api.github.com"],
        "/graphql",
        &[
            "updateTeamsRepository",
            "removeOutsideCollaborator",
            "addEnterpriseAdmin",
            "inviteEnterpriseAdmin",
            "removeEnterpriseAdmin",
            "updateEnterpriseAdministratorRole",
        ],
        "permission change",
    ),
    (&["api.github.com"], "/graphql", &["updateOrganization*", "updateEnterprise*"], "organisation change"),
    (
        &["api.github.com"],
        "/graphql",
        &[
            "updateRepository",
            "archiveRepository",
            "unarchiveRepository",
            "transferRepository",
            "updateRepositoryWebCommitSignoffSetting",
            "updateEnvironment",
        ],
        "repository settings",
    ),
];

const GITLAB_GRAPHQL: &[GraphqlRow] = &[
    (&["gitlab.com"], "/api/graphql", &["mergeRequestAccept"], "merge"),
    (&["gitlab.com"], "/api/graphql", &["destroy*", "*Delete", "*Destroy"], "delete"),
    (&["gitlab.com"], "/api/graphql", &["commitCreate", "branchCreate", "branchRule*"], "branch change"),
    (&["gitlab.com"], "/api/graphql", &["projectMember*", "groupMember*"], "permission change"),
    (
        &["gitlab.com"],
        "/api/graphql",
        &["projectSetLocked", "projectSettingsUpdate", "projectCiCdSettingsUpdate", "ciCdSettingsUpdate"],
        "project settings",
    ),
];

/// The ask rules of preset `name` (see [`ASK_PRESETS`]).
pub fn ask_preset(name: &str) -> Option<Vec<AskRule>> {
    let (rows, graphql_rows) = match name {
        "github" => (GITHUB, GITHUB_GRAPHQL),
        "gitlab" => (GITLAB, GITLAB_GRAPHQL),
        _ => return None,
    };
    let mut out = Vec::new();
    for (hosts, methods, path, what) in rows {
        for h in *hosts {
            let methods = methods.iter().map(|m| m.to_string()).collect();
            // The tables are constant and tested to parse.
            if let Ok(r) = AskRule::parse(h, None, methods, Some(path), format!("ask:{name} {what}")) {
                out.push(r);
            }
        }
    }
    for (hosts, path, mutations, what) in graphql_rows {
        let names: Vec<String> = mutations.iter().map(|m| m.to_string()).collect();
        for h in *hosts {
            let methods = GRAPHQL_METHODS.iter().map(|m| m.to_string()).collect();
            let origin = format!("ask:{name} graphql {what}");
            if let Ok(r) = AskRule::parse(h, None, methods, Some(path), origin).and_then(|r| r.with_graphql(&names)) {
                out.push(r);
            }
        }
    }
    Some(out)
}

// ----------------------------------------------------------- live rules

/// How long a live rule lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Limit {
    /// Until removed or reset (kept with the sandbox).
    Always,
    /// Until this instant (ms on the stack's clock: Unix time in sbx).
    Until(u64),
    /// For this many more requests (connections, for spliced HTTPS).
    Uses(u32),
    /// Until this run of the sandbox ends (never kept).
    UntilExit,
}

/// A live rule as asked for (from the command line or the admin socket).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// "allow" or "deny".
    pub action: String,
    /// HOST or HOST:PORT (ports 80 and 443 without one).
    pub host: String,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub path: Option<String>,
    /// Seconds from now (`--for`).
    #[serde(default)]
    pub for_secs: Option<u64>,
    #[serde(default)]
    pub uses: Option<u32>,
    #[serde(default)]
    pub until_exit: bool,
    /// `--graphql-mutation`: only GraphQL requests with these mutations
    /// (see [`LiveRule::graphql`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub graphql_mutations: Vec<String>,
}

/// A rule added while the sandbox lives (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveRule {
    pub id: u64,
    pub action: Action,
    pub pattern: Pattern,
    pub ports: Vec<u16>,
    pub methods: Vec<String>,
    pub path: Option<PathPattern>,
    pub limit: Limit,
    pub created_ms: u64,
    /// Who added it (the admin socket's peer), if known.
    pub by_uid: Option<u32>,
    /// Why it exists beyond a person's command: "approval of question 3".
    pub note: Option<String>,
    /// Scoped to GraphQL mutations (`--graphql-mutation`, or the approval
    /// of a GraphQL question): an allow matches only a request whose
    /// mutations' first-level fields are all known and all named (case
    /// compared), and lifts a GraphQL ask rule whose listed fields it all
    /// names; a deny matches a request with a named mutation (without
    /// regard to case), or whose mutations cannot be read (fail closed).
    pub graphql: Option<Vec<NamePattern>>,
}

/// What a live rule scoped to GraphQL mutations makes of a request its
/// host, port, methods and path match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scoped {
    Matches,
    No,
    /// The body decides and was not given.
    Unread,
}

impl fmt::Display for LiveRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.action == Action::Allow { "allow" } else { "deny" };
        write!(f, "live #{}: {verb} {} ports {}", self.id, self.pattern, ports_text(&self.ports))?;
        if !self.methods.is_empty() {
            write!(f, " methods {}", self.methods.join(","))?;
        }
        if let Some(p) = &self.path {
            write!(f, " path {}", p.as_str())?;
        }
        if let Some(names) = &self.graphql {
            write!(f, " graphql mutations {}", names_text(names))?;
        }
        Ok(())
    }
}

fn names_text(names: &[NamePattern]) -> String {
    names.iter().map(NamePattern::as_str).collect::<Vec<_>>().join(",")
}

impl LiveRule {
    /// What it opens (or shuts), in words, for the audit log and `sbx
    /// approve`: "graphql mutation createIssue on api.github.com:443/graphql",
    /// "POST to api.github.com:443/graphql", "everything to a.com:80,443".
    pub fn scope(&self) -> String {
        let at =
            format!("{}:{}{}", self.pattern, ports_text(&self.ports), self.path.as_ref().map_or("", |p| p.as_str()));
        let methods = if self.methods.is_empty() { String::new() } else { format!(" ({})", self.methods.join(",")) };
        match &self.graphql {
            Some(names) => {
                let s = if names.len() == 1 { "" } else { "s" };
                format!("graphql mutation{s} {} on {at}{methods}", names_text(names))
            }
            None if self.blanket() => format!("everything to {at}"),
            None if self.methods.is_empty() => format!("every method to {at}"),
            None => format!("{} to {at}", self.methods.join(",")),
        }
    }

    /// For a rule whose host, port, methods and path match `req`.
    fn graphql_match(&self, req: &Request<'_>, body: Option<&graphql::Scan>) -> Scoped {
        let Some(names) = &self.graphql else { return Scoped::Matches };
        let deny = self.action == Action::Deny;
        let Some((method, target)) = req.http else {
            return if deny { Scoped::Matches } else { Scoped::No };
        };
        match request_mutations(method, target, body) {
            None => Scoped::Unread,
            Some(None) if deny => Scoped::Matches,
            Some(None) => Scoped::No,
            Some(Some(fields)) if deny => match fields.iter().any(|f| names.iter().any(|n| n.matches(f))) {
                true => Scoped::Matches,
                false => Scoped::No,
            },
            Some(Some(fields)) => {
                match !fields.is_empty() && fields.iter().all(|f| names.iter().any(|n| n.matches_case(f))) {
                    true => Scoped::Matches,
                    false => Scoped::No,
                }
            }
        }
    }

    /// A GraphQL allow that names every one of `listed` (the fields an ask
    /// rule found), case compared.
    fn names_all(&self, listed: &[String]) -> bool {
        self.action == Action::Allow
            && self.graphql.as_ref().is_some_and(|names| listed.iter().all(|f| names.iter().any(|n| n.matches_case(f))))
    }

    /// What limits it, for `sbx policy ls`: "until reset", "12 s left",
    /// "3 uses left", "until the sandbox stops".
    pub fn limit_text(&self, now_ms: u64) -> String {
        match self.limit {
            Limit::Always => "until reset".into(),
            Limit::Until(t) => format!("{} s left", t.saturating_sub(now_ms).div_ceil(1000)),
            Limit::Uses(n) => format!("{n} uses left"),
            Limit::UntilExit => "until the sandbox stops".into(),
        }
    }

    fn live_at(&self, now_ms: u64) -> bool {
        match self.limit {
            Limit::Until(t) => now_ms < t,
            Limit::Uses(n) => n > 0,
            Limit::Always | Limit::UntilExit => true,
        }
    }

    fn matches(&self, req: &Request<'_>, now_ms: u64) -> bool {
        self.live_at(now_ms)
            && self.pattern.matches(req.host)
            && self.ports.contains(&req.port)
            && narrowed_matches(&self.methods, self.path.as_ref(), req, self.action == Action::Deny)
    }

    fn blanket(&self) -> bool {
        self.methods.is_empty() && self.path.is_none() && self.graphql.is_none()
    }

    /// Builds a rule from what a person asked (every field checked).
    pub fn from_spec(spec: &RuleSpec, id: u64, now_ms: u64) -> Result<LiveRule, Error> {
        let action = match spec.action.as_str() {
            "allow" => Action::Allow,
            "deny" => Action::Deny,
            other => return Err(Error::Action(other.chars().take(20).collect())),
        };
        let (pattern, ports) = parse_host_port(&spec.host)?;
        check_methods(&spec.methods)?;
        let path = spec.path.as_deref().map(PathPattern::parse).transpose()?;
        let graphql = match spec.graphql_mutations.as_slice() {
            [] => None,
            names if names.len() > MAX_GRANT_MUTATIONS => {
                return Err(Error::Graphql(format!(
                    "a live rule names at most {MAX_GRANT_MUTATIONS} GraphQL mutations"
                )))
            }
            // A deny fails closed on a body it cannot read; on every
            // path of the host that would be every POST of a REST API.
            _ if action == Action::Deny && path.is_none() => {
                return Err(Error::Graphql(
                    "a deny with --graphql-mutation needs --path (the GraphQL endpoint, such as /graphql)".into(),
                ))
            }
            names => Some(
                names.iter().map(|n| NamePattern::parse(n)).collect::<Result<Vec<_>, _>>().map_err(Error::Graphql)?,
            ),
        };
        let limit = match (spec.for_secs, spec.uses, spec.until_exit) {
            (None, None, false) => Limit::Always,
            (Some(s), None, false) if (1..=MAX_GRANT_SECS).contains(&s) => Limit::Until(now_ms + s * 1000),
            (None, Some(n), false) if (1..=MAX_USES).contains(&n) => Limit::Uses(n),
            (None, None, true) => Limit::UntilExit,
            (Some(_), None, false) | (None, Some(_), false) => return Err(Error::LimitRange),
            _ => return Err(Error::Limit),
        };
        Ok(LiveRule {
            id,
            action,
            pattern,
            ports,
            methods: spec.methods.clone(),
            path,
            limit,
            created_ms: now_ms,
            by_uid: None,
            note: None,
            graphql,
        })
    }
}

/// `HOST` (ports 80 and 443) or `HOST:PORT`.
pub fn parse_host_port(raw: &str) -> Result<(Pattern, Vec<u16>), Error> {
    let (host, ports) = match raw.rsplit_once(':') {
        Some((h, p)) => {
            let port = p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| Error::Port(raw.to_string()))?;
            (h, vec![port])
        }
        None => (raw, vec![80, 443]),
    };
    let pattern = Pattern::parse(host).map_err(|e| Error::Host(host.chars().take(80).collect(), e.to_string()))?;
    Ok((pattern, ports))
}

/// A live rule as kept in `live-policy.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredRule {
    id: u64,
    action: String,
    host: String,
    ports: Vec<u16>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    path: Option<String>,
    limit: Limit,
    created_ms: u64,
    #[serde(default)]
    by_uid: Option<u32>,
    #[serde(default)]
    note: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    graphql_mutations: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredFile {
    version: u32,
    next_id: u64,
    rules: Vec<StoredRule>,
}

/// A sandbox's live rules, in the order they were added.
#[derive(Debug, Clone, Default)]
pub struct LiveRules {
    rules: Vec<LiveRule>,
    next_id: u64,
    /// The earliest `--for` expiry among `rules` (kept up to date by every
    /// change): the stack's clock ticks every round, and with thousands of
    /// rules a scan per round would cost more than the requests.
    soonest: Option<u64>,
    /// The machine's admin layer (never persisted: sbx reads it from its
    /// file at each run and when the file changes).
    admin: Arc<AdminLayer>,
}

impl PartialEq for LiveRules {
    fn eq(&self, other: &Self) -> bool {
        self.rules == other.rules && self.next_id == other.next_id
    }
}

impl Eq for LiveRules {}

impl LiveRules {
    pub fn list(&self) -> &[LiveRule] {
        &self.rules
    }

    /// The admin layer these rules are judged under.
    pub fn admin(&self) -> &AdminLayer {
        &self.admin
    }

    /// Replaces the admin layer (see [`Live::set_admin`]).
    pub fn set_admin(&mut self, admin: Arc<AdminLayer>) {
        self.admin = admin;
    }

    /// Adds a rule; its id.
    pub fn add(
        &mut self,
        spec: &RuleSpec,
        now_ms: u64,
        by_uid: Option<u32>,
        note: Option<String>,
    ) -> Result<u64, Error> {
        if self.rules.len() >= MAX_LIVE_RULES {
            return Err(Error::TooMany);
        }
        let id = self.next_id.max(1);
        let mut rule = LiveRule::from_spec(spec, id, now_ms)?;
        rule.by_uid = by_uid;
        rule.note = note;
        self.next_id = id + 1;
        if let Limit::Until(t) = rule.limit {
            self.soonest = Some(self.soonest.map_or(t, |s| s.min(t)));
        }
        self.rules.push(rule);
        Ok(id)
    }

    pub fn remove(&mut self, id: u64) -> Result<LiveRule, Error> {
        let i = self.rules.iter().position(|r| r.id == id).ok_or(Error::NoRule(id))?;
        let r = self.rules.remove(i);
        self.refresh();
        Ok(r)
    }

    pub fn reset(&mut self) {
        self.rules.clear();
        self.soonest = None;
    }

    /// The first live rule of `action` that decides `req` at `now_ms`
    /// (one scoped to GraphQL mutations only with the body: [`LiveRules::matching_body`]).
    pub fn matching(&self, action: Action, req: &Request<'_>, now_ms: u64) -> Option<&LiveRule> {
        self.matching_body(action, req, None, now_ms).0
    }

    /// [`LiveRules::matching`] with what the body holds; and whether a
    /// rule scoped to GraphQL mutations needs the body, not given.
    pub fn matching_body(
        &self,
        action: Action,
        req: &Request<'_>,
        body: Option<&graphql::Scan>,
        now_ms: u64,
    ) -> (Option<&LiveRule>, bool) {
        let mut unread = false;
        for r in self.rules.iter().filter(|r| r.action == action && r.matches(req, now_ms)) {
            match r.graphql_match(req, body) {
                Scoped::Matches => return (Some(r), unread),
                Scoped::Unread => unread = true,
                Scoped::No => {}
            }
        }
        (None, unread)
    }

    /// A live GraphQL allow whose host, port, methods and path match
    /// `req` and that names every one of `listed`.
    fn covering(&self, req: &Request<'_>, listed: &[String], now_ms: u64) -> Option<&LiveRule> {
        self.rules.iter().find(|r| r.names_all(listed) && r.matches(req, now_ms))
    }

    /// Counts one use of rule `id`; the rule if that was its last.
    pub fn consume(&mut self, id: u64) -> Option<LiveRule> {
        let i = self.rules.iter().position(|r| r.id == id)?;
        if let Limit::Uses(n) = &mut self.rules[i].limit {
            *n = n.saturating_sub(1);
            if *n == 0 {
                return Some(self.rules.remove(i));
            }
        }
        None
    }

    /// Takes out the rules whose time is up at `now_ms`.
    pub fn expire(&mut self, now_ms: u64) -> Vec<LiveRule> {
        if self.soonest.is_none_or(|t| now_ms < t) {
            return Vec::new();
        }
        let (gone, kept) = std::mem::take(&mut self.rules).into_iter().partition(|r| !r.live_at(now_ms));
        self.rules = kept;
        self.refresh();
        gone
    }

    /// The earliest time a rule expires.
    pub fn next_expiry(&self) -> Option<u64> {
        self.soonest
    }

    fn refresh(&mut self) {
        self.soonest =
            self.rules.iter().filter_map(|r| if let Limit::Until(t) = r.limit { Some(t) } else { None }).min();
    }

    /// The persisted form: every rule but `--until-exit` ones.
    pub fn to_json(&self) -> String {
        let rules = self
            .rules
            .iter()
            .filter(|r| r.limit != Limit::UntilExit)
            .map(|r| StoredRule {
                id: r.id,
                action: if r.action == Action::Allow { "allow" } else { "deny" }.into(),
                host: r.pattern.to_string(),
                ports: r.ports.clone(),
                methods: r.methods.clone(),
                path: r.path.as_ref().map(|p| p.raw.clone()),
                limit: r.limit,
                created_ms: r.created_ms,
                by_uid: r.by_uid,
                note: r.note.clone(),
                graphql_mutations: r.graphql.iter().flatten().map(|n| n.as_str().to_string()).collect(),
            })
            .collect();
        let file = StoredFile { version: 1, next_id: self.next_id, rules };
        serde_json::to_string_pretty(&file).unwrap_or_default()
    }

    /// Reads the persisted form back, every rule checked as user input;
    /// rules expired by `now_ms` are dropped (their count is returned).
    pub fn from_json(text: &[u8], now_ms: u64) -> Result<(LiveRules, usize), Error> {
        if text.len() > MAX_LIVE_FILE {
            return Err(Error::FileSize(text.len()));
        }
        let file: StoredFile = serde_json::from_slice(text).map_err(|e| Error::File(e.to_string()))?;
        if file.version != 1 {
            return Err(Error::File(format!("version {} (expected 1)", file.version)));
        }
        if file.rules.len() > MAX_LIVE_RULES {
            return Err(Error::TooMany);
        }
        let mut out = LiveRules {
            rules: Vec::with_capacity(file.rules.len()),
            next_id: file.next_id,
            soonest: None,
            admin: Arc::default(),
        };
        let mut expired = 0;
        for (i, s) in file.rules.into_iter().enumerate() {
            let ctx = |e: Error| Error::File(format!("rule {}: {e}", i + 1));
            if s.id == 0 || s.id >= file.next_id || out.rules.iter().any(|r| r.id == s.id) {
                return Err(ctx(Error::File(format!("id {} is 0, repeated or not below next_id", s.id))));
            }
            if s.ports.is_empty() || s.ports.len() > 16 || s.ports.contains(&0) {
                return Err(ctx(Error::Port(s.host.clone())));
            }
            if s.note.as_ref().is_some_and(|n| n.len() > 200 || n.chars().any(char::is_control)) {
                return Err(ctx(Error::File("note too long or with control characters".into())));
            }
            let spec = RuleSpec {
                action: s.action,
                host: s.host,
                methods: s.methods,
                path: s.path,
                for_secs: None,
                uses: None,
                until_exit: false,
                graphql_mutations: s.graphql_mutations,
            };
            let mut rule = LiveRule::from_spec(&spec, s.id, s.created_ms).map_err(ctx)?;
            rule.ports = s.ports;
            rule.limit = match s.limit {
                Limit::UntilExit => return Err(ctx(Error::File("until-exit rules are never kept".into()))),
                Limit::Uses(n) if n == 0 || n > MAX_USES => return Err(ctx(Error::LimitRange)),
                l => l,
            };
            rule.by_uid = s.by_uid;
            rule.note = s.note;
            if rule.live_at(now_ms) {
                out.rules.push(rule);
            } else {
                expired += 1;
            }
        }
        out.refresh();
        Ok((out, expired))
    }
}

// ------------------------------------------------------------- decisions

/// What is to be done with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
    /// Held for a person (on this question).
    Ask(QKey),
}

/// What a question is about: requests to one host and port, held by one
/// ask rule (its text) or by the default (`approval = "ask"`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QKey {
    pub host: HostName,
    pub port: u16,
    pub rule: Option<String>,
    /// For a GraphQL ask rule: the listed mutations found
    /// ([`Judgement::mutations`]). Requests with other mutations wait on
    /// another question, so a yes to `createIssue` (and the further
    /// requests of the same kind on those connections) never lets a
    /// `deleteRepository` go.
    pub mutations: Option<Vec<String>>,
}

/// A decision and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement {
    pub verdict: Verdict,
    /// The deciding rule's text, if a rule decided.
    pub rule: Option<String>,
    /// "allowed by …", "denied by …", "held by …".
    pub reason: String,
    /// The live grant that allowed it (a use is counted).
    pub grant: Option<u64>,
    /// The ask rule that holds it.
    pub ask: Option<AskRule>,
    /// Held only because the body was not given: a GraphQL ask rule holds
    /// the request if its body has a listed mutation. Judge again with the
    /// body ([`judge_body`], at most [`graphql::MAX_BODY`] bytes).
    pub needs_body: bool,
    /// What a GraphQL ask rule found: "mutation mergePullRequest".
    pub detail: Option<String>,
    /// The listed mutation fields a GraphQL ask rule holds it for, where
    /// all are known: what a lasting approval is scoped to.
    pub mutations: Option<Vec<String>>,
}

impl Judgement {
    fn new(verdict: Verdict, rule: Option<String>, reason: String) -> Judgement {
        Judgement { verdict, rule, reason, grant: None, ask: None, needs_body: false, detail: None, mutations: None }
    }

    pub fn allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }
}

fn held_by_default(host: &HostName, port: u16) -> Judgement {
    let key = QKey { host: host.clone(), port, rule: None, mutations: None };
    Judgement::new(Verdict::Ask(key), None, "held: no rule allows it (approval = ask)".into())
}

/// THE decision for one request (HTTP method and target where readable):
/// admin deny > live deny > static deny > admin ask > live allow > static
/// ask > static allow > default. Both the stack and `sbx policy explain`
/// call it. Without the body, a request a GraphQL ask rule might hold is
/// held with [`Judgement::needs_body`] set (fail closed; the stack then
/// reads the body and asks [`judge_body`]; explain says "if its body is
/// one of its GraphQL mutations").
pub fn judge(policy: &Policy, live: &LiveRules, req: &Request<'_>, now_ms: u64) -> Judgement {
    judge_body(policy, live, req, None, now_ms)
}

/// [`judge`] with what the request's body holds ([`graphql::scan_body`],
/// or the framing error that kept it from being read), for GraphQL ask
/// rules; `None`: not read.
pub fn judge_body(
    policy: &Policy,
    live: &LiveRules,
    req: &Request<'_>,
    body: Option<&graphql::Scan>,
    now_ms: u64,
) -> Judgement {
    if let Some(r) = live.admin.deny_for(req) {
        return Judgement::new(Verdict::Deny, Some(r.to_string()), format!("denied by {r}"));
    }
    let held = |a: &AskRule, detail: Option<String>, mutations: Option<Vec<String>>| {
        let key =
            QKey { host: req.host.clone(), port: req.port, rule: Some(a.to_string()), mutations: mutations.clone() };
        let reason = match &detail {
            Some(d) => format!("held by {a} ({d})"),
            None => format!("held by {a}"),
        };
        let mut j = Judgement::new(Verdict::Ask(key), Some(a.to_string()), reason);
        j.ask = Some(a.clone());
        j.detail = detail;
        j.mutations = mutations;
        j
    };
    let unread_body = |a: &AskRule| {
        let mut j = held(a, Some("if its body is one of its GraphQL mutations".into()), None);
        j.needs_body = true;
        j
    };
    match live.matching_body(Action::Deny, req, body, now_ms) {
        (Some(r), _) => return Judgement::new(Verdict::Deny, Some(r.to_string()), format!("denied by {r}")),
        // Fail closed until the body is read (the stack reads it when told).
        (None, true) => {
            let mut j = Judgement::new(
                Verdict::Deny,
                None,
                "denied by a live deny of GraphQL mutations if its body has one of them".into(),
            );
            j.needs_body = true;
            return j;
        }
        (None, false) => {}
    }
    let d = policy.decide(req);
    if let (Action::Deny, Some(rule)) = (d.action, &d.rule) {
        return Judgement::new(Verdict::Deny, Some(rule.to_string()), d.to_string());
    }
    // The admin's ask rules ask whatever else allows it (a body not read
    // yet is waited for).
    for a in live.admin.asks.iter().filter(|a| a.matches(req)) {
        match a.graphql_asked(req, body) {
            GraphqlAsk::Plain => return held(a, None, None),
            // No grant lifts it; the mutations still tell its questions apart.
            GraphqlAsk::Asked(why, listed) => return held(a, Some(why), listed),
            GraphqlAsk::NotListed => {}
            GraphqlAsk::Unread => return unread_body(a),
        }
    }
    let (allow, allow_unread) = live.matching_body(Action::Allow, req, body, now_ms);
    if let Some(r) = allow {
        let mut j = Judgement::new(Verdict::Allow, Some(r.to_string()), format!("allowed by {r}"));
        j.grant = Some(r.id);
        return j;
    }
    let mut unread = None;
    // A live GraphQL allow naming every listed field an ask rule found
    // lifts that rule (the person said yes to those mutations there).
    let mut lifted: Option<&LiveRule> = None;
    for a in policy.asks.iter().filter(|a| a.matches(req)) {
        match a.graphql_asked(req, body) {
            GraphqlAsk::Plain => return held(a, None, None),
            GraphqlAsk::Asked(why, Some(listed)) => match live.covering(req, &listed, now_ms) {
                Some(r) => lifted = lifted.or(Some(r)),
                None => return held(a, Some(why), Some(listed)),
            },
            GraphqlAsk::Asked(why, None) => return held(a, Some(why), None),
            GraphqlAsk::NotListed => {}
            GraphqlAsk::Unread => unread = unread.or(Some(a)),
        }
    }
    if d.action == Action::Allow {
        if let Some(a) = unread {
            return unread_body(a);
        }
        let mut j = Judgement::new(Verdict::Allow, d.rule.as_ref().map(|r| r.to_string()), d.to_string());
        if let Some(r) = lifted {
            j.reason += &format!("; its asked GraphQL mutations granted by {r}");
            j.grant = Some(r.id);
        }
        return j;
    }
    let mut j = match policy.approval {
        Approval::Ask => held_by_default(req.host, req.port),
        Approval::Deny => Judgement::new(Verdict::Deny, None, d.to_string()),
    };
    // A live GraphQL allow may allow it once the body is read.
    j.needs_body = allow_unread;
    j
}

/// Whether a connection to `host:port` that netstack terminates is worth
/// accepting (each request inside is then judged): denied only by a
/// blanket deny (live or static); allowed if some request could be
/// allowed or asked; else held or denied by default.
pub fn judge_reachable(policy: &Policy, live: &LiveRules, host: &HostName, port: u16, now_ms: u64) -> Judgement {
    let req = Request { host, port, http: None };
    if let Some(r) = live.admin.blanket_deny(host, port) {
        return Judgement::new(Verdict::Deny, Some(r.to_string()), format!("denied by {r}"));
    }
    if let Some(r) = live.rules.iter().find(|r| r.action == Action::Deny && r.blanket() && r.matches(&req, now_ms)) {
        return Judgement::new(Verdict::Deny, Some(r.to_string()), format!("denied by {r}"));
    }
    let d = policy.reachable(host, port);
    if let (Action::Deny, Some(rule)) = (d.action, &d.rule) {
        return Judgement::new(Verdict::Deny, Some(rule.to_string()), d.to_string());
    }
    let live_allow = live
        .rules
        .iter()
        .find(|r| r.action == Action::Allow && r.live_at(now_ms) && r.pattern.matches(host) && r.ports.contains(&port));
    if let Some(r) = live_allow {
        return Judgement::new(Verdict::Allow, Some(r.to_string()), format!("allowed by {r}"));
    }
    let asks = live.admin.asks.iter().chain(&policy.asks);
    if let Some(a) = asks.into_iter().find(|a| a.pattern.matches(host) && a.ports.contains(&port)) {
        return Judgement::new(Verdict::Allow, Some(a.to_string()), format!("reachable: {a}"));
    }
    if d.action == Action::Allow {
        return Judgement::new(Verdict::Allow, d.rule.as_ref().map(|r| r.to_string()), d.to_string());
    }
    match policy.approval {
        Approval::Ask => held_by_default(host, port),
        Approval::Deny => Judgement::new(Verdict::Deny, None, d.to_string()),
    }
}

/// Whether DNS answers `host`: not if a blanket deny (live, or static on
/// ports 80 and 443) names it; yes if some rule could allow or ask a
/// request to it, or approval is ask.
pub fn judge_resolvable(policy: &Policy, live: &LiveRules, host: &HostName, now_ms: u64) -> Judgement {
    if let Some(r) = live.admin.name_deny(host) {
        return Judgement::new(Verdict::Deny, Some(r.to_string()), format!("denied by {r}"));
    }
    let live_deny = live.rules.iter().find(|r| {
        r.action == Action::Deny
            && r.blanket()
            && r.live_at(now_ms)
            && r.pattern.matches(host)
            && [80, 443].iter().all(|p| r.ports.contains(p))
    });
    if let Some(r) = live_deny {
        return Judgement::new(Verdict::Deny, Some(r.to_string()), format!("denied by {r}"));
    }
    let d = policy.resolvable(host);
    if let (Action::Deny, Some(rule)) = (d.action, &d.rule) {
        return Judgement::new(Verdict::Deny, Some(rule.to_string()), d.to_string());
    }
    let live_allow =
        live.rules.iter().find(|r| r.action == Action::Allow && r.live_at(now_ms) && r.pattern.matches(host));
    if let Some(r) = live_allow {
        return Judgement::new(Verdict::Allow, Some(r.to_string()), format!("allowed by {r}"));
    }
    if d.action == Action::Allow {
        return Judgement::new(Verdict::Allow, d.rule.as_ref().map(|r| r.to_string()), d.to_string());
    }
    if let Some(a) = live.admin.asks.iter().chain(&policy.asks).find(|a| a.pattern.matches(host)) {
        return Judgement::new(Verdict::Allow, Some(a.to_string()), format!("resolvable: {a}"));
    }
    match policy.approval {
        Approval::Ask => Judgement::new(Verdict::Allow, None, "resolvable: approval = ask".into()),
        Approval::Deny => Judgement::new(Verdict::Deny, None, d.to_string()),
    }
}

/// Whether netstack terminates TLS to `host:port` (given a CA): the
/// policy says so, or an ask rule or a narrowed live rule names it.
pub fn terminates(policy: &Policy, live: &LiveRules, host: &HostName, port: u16) -> bool {
    policy.terminates(host, port)
        || live.admin.needs_requests(host, port)
        || policy.asks.iter().any(|a| a.pattern.matches(host) && a.ports.contains(&port))
        || live.rules.iter().any(|r| !r.blanket() && r.pattern.matches(host) && r.ports.contains(&port))
}

// ------------------------------------------------------------ questions

/// How a held question was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Pending,
    Approved {
        by: u32,
    },
    Rejected {
        by: u32,
    },
    TimedOut,
    /// No such question (its connections all went away).
    Gone,
}

/// What `sbx approve` grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    /// What waits goes ahead; nothing is remembered.
    Once,
    /// A live allow for this many seconds.
    ForSecs(u64),
    /// A live allow kept until reset.
    Always,
    /// A live allow until this run of the sandbox ends (`sbx run --learn`).
    UntilExit,
}

/// Requests to one host:port (and ask rule) waiting for a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub id: u64,
    pub key: QKey,
    pub ask: Option<AskRule>,
    /// The first request's method and path, where readable.
    pub method: Option<String>,
    pub path: Option<String>,
    /// What a GraphQL ask rule found in the first request
    /// ("mutation mergePullRequest"), printable.
    pub detail: Option<String>,
    /// The listed mutation fields of the first request, where all are
    /// known ([`Judgement::mutations`]): a lasting approval grants these,
    /// at the ask rule's methods and path, and no other mutation.
    pub mutations: Option<Vec<String>>,
    pub first_ms: u64,
    /// Requests that joined it.
    pub count: u64,
    /// Connections waiting on it now.
    pub waiting: usize,
    pub deadline_ms: u64,
    pub answer: Answer,
}

struct State {
    rules: LiveRules,
    questions: Vec<Question>,
    next_q: u64,
    held_conns: usize,
    events: Vec<Value>,
    dropped_events: u64,
    now_ms: u64,
    hold_ms: u64,
    /// The audit log failed: everything is denied.
    failed: bool,
    /// Changed since last persisted (uses counted, grants expired).
    dirty: bool,
    /// `sbx run --learn`: every question is answered yes at once.
    learn: bool,
}

impl State {
    fn event(&mut self, e: Value) {
        if self.events.len() < MAX_QUEUED_EVENTS {
            self.events.push(e);
        } else {
            self.dropped_events += 1;
        }
    }
}

/// Called when a person's answer or a rule change wants the stack to run.
pub type Notify = Arc<dyn Fn() + Send + Sync>;
/// Told one line about each new question (sbx: stderr without a pty).
pub type Announce = Arc<dyn Fn(&str) + Send + Sync>;

/// One sandbox's live state, shared by its stack and its admin thread.
pub struct Live {
    state: Mutex<State>,
    waker: Mutex<Option<Notify>>,
    announce: Mutex<Option<Announce>>,
    /// The sandbox's name, for the deny answer's hint.
    pub sandbox: String,
}

impl fmt::Debug for Live {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Live({})", self.sandbox)
    }
}

/// A held connection's place in its question; given back when dropped.
#[derive(Debug)]
pub struct Ticket {
    live: Arc<Live>,
    pub id: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut s = self.live.lock();
        s.held_conns = s.held_conns.saturating_sub(1);
        if let Some(q) = s.questions.iter_mut().find(|q| q.id == self.id) {
            q.waiting = q.waiting.saturating_sub(1);
        }
    }
}

impl Live {
    pub fn new(sandbox: &str, rules: LiveRules) -> Arc<Live> {
        Live::with_hold(sandbox, rules, DEFAULT_HOLD_MS)
    }

    /// Held requests wait `hold_ms` for an answer.
    pub fn with_hold(sandbox: &str, rules: LiveRules, hold_ms: u64) -> Arc<Live> {
        Arc::new(Live {
            state: Mutex::new(State {
                rules,
                questions: Vec::new(),
                next_q: 1,
                held_conns: 0,
                events: Vec::new(),
                dropped_events: 0,
                now_ms: 0,
                hold_ms,
                failed: false,
                dirty: false,
                learn: false,
            }),
            waker: Mutex::new(None),
            announce: Mutex::new(None),
            sandbox: sandbox.to_string(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_waker(&self, waker: Notify) {
        *self.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(waker);
    }

    pub fn set_announce(&self, announce: Announce) {
        *self.announce.lock().unwrap_or_else(|p| p.into_inner()) = Some(announce);
    }

    fn wake(&self) {
        let w = self.waker.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(w) = w {
            w();
        }
    }

    /// The stack's clock now (ms).
    pub fn now(&self) -> u64 {
        self.lock().now_ms
    }

    /// Advances the clock: grants whose time is up end, questions whose
    /// time is up time out; each logged.
    pub fn tick(&self, now_ms: u64) {
        let mut s = self.lock();
        s.now_ms = s.now_ms.max(now_ms);
        let now = s.now_ms;
        for r in s.rules.expire(now) {
            s.dirty = true;
            s.event(json!({"event": "live", "change": "expired", "rule": r.to_string(),
                "note": "the grant's time is up: such requests are judged without it (denied again unless another rule allows them)"}));
        }
        let mut timed_out = Vec::new();
        for q in s.questions.iter_mut().filter(|q| q.answer == Answer::Pending && now >= q.deadline_ms) {
            q.answer = Answer::TimedOut;
            timed_out.push((q.id, q.key.clone(), q.count));
        }
        for (id, key, count) in timed_out {
            s.event(json!({"event": "approval", "question": id, "host": key.host.as_str(), "port": key.port,
                "decision": "deny", "answer": "timed out", "requests": count}));
        }
        // Answered questions nobody waits on: keep the last few for `ls`.
        let answered = s.questions.iter().filter(|q| q.answer != Answer::Pending && q.waiting == 0).count();
        let mut drop = answered.saturating_sub(KEEP_ANSWERED);
        s.questions.retain(|q| {
            let gone = drop > 0 && q.answer != Answer::Pending && q.waiting == 0;
            drop -= usize::from(gone);
            !gone
        });
    }

    /// The audit events queued since last asked.
    pub fn take_events(&self) -> Vec<Value> {
        let mut s = self.lock();
        let mut out = std::mem::take(&mut s.events);
        if s.dropped_events > 0 {
            out.push(json!({"event": "live", "suppressed": s.dropped_events}));
            s.dropped_events = 0;
        }
        out
    }

    /// When the stack must next [`Live::tick`] (a grant or a hold ends).
    pub fn next_due(&self) -> Option<u64> {
        let s = self.lock();
        let q = s.questions.iter().filter(|q| q.answer == Answer::Pending).map(|q| q.deadline_ms).min();
        [q, s.rules.next_expiry()].into_iter().flatten().min()
    }

    /// Learning (`sbx run --learn`): each new question is answered yes at
    /// once, until the run ends, and recorded as learned in the audit log
    /// (for `sbx policy suggest`).
    pub fn set_learn(&self, on: bool) {
        self.lock().learn = on;
    }

    /// Puts the machine's admin layer in force (at start, and each time
    /// its file changes: `change` says which), logged with the file's
    /// SHA-256; the stack is woken to judge by it.
    pub fn set_admin(&self, admin: AdminLayer, change: &str) {
        let mut s = self.lock();
        s.event(json!({"event": "admin_policy", "change": change, "sha256": admin.sha256,
            "deny_rules": admin.denies.len(), "ask_rules": admin.asks.len()}));
        s.rules.set_admin(Arc::new(admin));
        drop(s);
        self.wake();
    }

    /// The admin policy's file changed but cannot be used: logged; the
    /// last good layer stays in force (never none because of a bad file).
    pub fn admin_error(&self, error: &str) {
        let mut s = self.lock();
        let kept = s.rules.admin.sha256.clone();
        s.event(json!({"event": "admin_policy", "change": "refused", "error": printable(error),
            "kept_sha256": kept, "note": "the last good admin policy stays in force"}));
        drop(s);
        self.wake();
    }

    /// The admin layer in force.
    pub fn admin(&self) -> Arc<AdminLayer> {
        self.lock().rules.admin.clone()
    }

    /// From now on everything is denied (the audit log cannot be written).
    pub fn fail(&self) {
        self.lock().failed = true;
    }

    fn failed_judgement() -> Judgement {
        Judgement::new(Verdict::Deny, None, "denied: the audit log cannot be written".into())
    }

    /// [`judge`] with this sandbox's live rules at the stack's clock.
    pub fn judge(&self, policy: &Policy, req: &Request<'_>) -> Judgement {
        let s = self.lock();
        if s.failed {
            return Live::failed_judgement();
        }
        judge(policy, &s.rules, req, s.now_ms)
    }

    /// [`judge_body`] with this sandbox's live rules at the stack's clock.
    pub fn judge_body(&self, policy: &Policy, req: &Request<'_>, body: Option<&graphql::Scan>) -> Judgement {
        let s = self.lock();
        if s.failed {
            return Live::failed_judgement();
        }
        judge_body(policy, &s.rules, req, body, s.now_ms)
    }

    pub fn judge_reachable(&self, policy: &Policy, host: &HostName, port: u16) -> Judgement {
        let s = self.lock();
        if s.failed {
            return Live::failed_judgement();
        }
        judge_reachable(policy, &s.rules, host, port, s.now_ms)
    }

    pub fn judge_resolvable(&self, policy: &Policy, host: &HostName) -> Judgement {
        let s = self.lock();
        if s.failed {
            return Live::failed_judgement();
        }
        judge_resolvable(policy, &s.rules, host, s.now_ms)
    }

    pub fn terminates(&self, policy: &Policy, host: &HostName, port: u16) -> bool {
        terminates(policy, &self.lock().rules, host, port)
    }

    /// Counts a use of grant `id` (logged when it was the last).
    pub fn consume(&self, id: u64) {
        let mut s = self.lock();
        if let Some(r) = s.rules.consume(id) {
            s.event(json!({"event": "live", "change": "used up", "rule": r.to_string(),
                "note": "the grant's uses are spent: such requests are judged without it"}));
        }
        s.dirty = true;
    }

    /// Holds a request on the question for `key` (made if new). Err: the
    /// bounds are reached (the request is to be denied, with this reason).
    pub fn hold(
        self: &Arc<Self>,
        key: QKey,
        ask: Option<AskRule>,
        http: Option<(&str, &str)>,
    ) -> Result<Ticket, String> {
        self.hold_detail(key, ask, http, None)
    }

    /// [`Live::hold`], with what a GraphQL ask rule found (shown with a
    /// new question: [`Question::detail`]).
    pub fn hold_detail(
        self: &Arc<Self>,
        key: QKey,
        ask: Option<AskRule>,
        http: Option<(&str, &str)>,
        detail: Option<&str>,
    ) -> Result<Ticket, String> {
        self.hold_graphql(key, ask, http, detail, None)
    }

    /// [`Live::hold_detail`], with the listed mutation fields a GraphQL ask
    /// rule found ([`Judgement::mutations`]: what a lasting approval of a
    /// new question is scoped to; without them, a GraphQL question is
    /// approved only `--once`).
    pub fn hold_graphql(
        self: &Arc<Self>,
        key: QKey,
        ask: Option<AskRule>,
        http: Option<(&str, &str)>,
        detail: Option<&str>,
        mutations: Option<Vec<String>>,
    ) -> Result<Ticket, String> {
        let mut s = self.lock();
        if s.held_conns >= MAX_HELD_CONNS {
            return Err(format!("denied: {MAX_HELD_CONNS} connections already wait for an answer"));
        }
        let now = s.now_ms;
        let mut told = None;
        let id = match s.questions.iter_mut().find(|q| q.key == key && q.answer == Answer::Pending) {
            Some(q) => {
                q.count += 1;
                q.waiting += 1;
                q.id
            }
            None => {
                if s.questions.iter().filter(|q| q.answer == Answer::Pending).count() >= MAX_QUESTIONS {
                    return Err(format!("denied: {MAX_QUESTIONS} questions already wait for an answer"));
                }
                let id = s.next_q;
                s.next_q += 1;
                let deadline_ms = now.saturating_add(s.hold_ms);
                let (method, path) = match http {
                    Some((m, p)) => (Some(m.to_string()), Some(p.chars().take(200).collect())),
                    None => (None, None),
                };
                let wait_ms = s.hold_ms;
                let detail: Option<String> = detail.map(|d| printable(d).chars().take(200).collect());
                let mut event = json!({"event": "approval", "question": id, "host": key.host.as_str(),
                    "port": key.port, "method": method, "path": path, "rule": key.rule, "decision": "held",
                    "wait_ms": wait_ms});
                if let Some(d) = &detail {
                    event["graphql"] = json!(d);
                }
                s.event(event);
                let line = format!(
                    "sbx: request held: {} {}:{}{}{}: `sbx approve {} {id}` or `sbx reject {} {id}`",
                    method.as_deref().unwrap_or("TLS"),
                    key.host,
                    key.port,
                    path.as_deref().unwrap_or(""),
                    detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default(),
                    self.sandbox,
                    self.sandbox
                );
                s.questions.push(Question {
                    id,
                    key,
                    ask,
                    method,
                    path,
                    detail,
                    mutations,
                    first_ms: now,
                    count: 1,
                    waiting: 1,
                    deadline_ms,
                    answer: Answer::Pending,
                });
                told = Some(line);
                id
            }
        };
        s.held_conns += 1;
        // An admin ask rule's question is always a person's to answer.
        let learn = s.learn
            && s.questions
                .iter()
                .any(|q| q.id == id && q.answer == Answer::Pending && !q.ask.as_ref().is_some_and(AskRule::is_admin));
        drop(s);
        // Told outside the lock (a slow stderr never stalls the stack's
        // decisions).
        let announce = self.announce.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let (Some(a), Some(line)) = (announce, told) {
            a(&printable(&line));
        }
        if learn {
            let _ = self.answer_yes(id, Grant::UntilExit, 0, "learned");
        }
        Ok(Ticket { live: self.clone(), id })
    }

    pub fn answer(&self, id: u64) -> Answer {
        self.lock().questions.iter().find(|q| q.id == id).map_or(Answer::Gone, |q| q.answer)
    }

    /// The questions (waiting first), for `sbx approvals`.
    pub fn questions(&self) -> Vec<Question> {
        let mut q = self.lock().questions.clone();
        q.sort_by_key(|q| (q.answer != Answer::Pending, q.id));
        q
    }

    /// A person says yes to question `id`; `grant` says for how long.
    pub fn approve(&self, id: u64, grant: Grant, by: u32) -> Result<Option<u64>, Error> {
        self.answer_yes(id, grant, by, "approved")
    }

    fn answer_yes(&self, id: u64, grant: Grant, by: u32, word: &str) -> Result<Option<u64>, Error> {
        let mut s = self.lock();
        let now = s.now_ms;
        let q = s.questions.iter_mut().find(|q| q.id == id).ok_or(Error::NoQuestion(id))?;
        if q.answer != Answer::Pending {
            return Err(Error::Answered(id));
        }
        q.answer = Answer::Approved { by };
        let q = q.clone();
        let spec = |limit: (Option<u64>, bool)| RuleSpec {
            action: "allow".into(),
            host: format!("{}:{}", q.key.host, q.key.port),
            methods: q.ask.as_ref().map(|a| a.methods.clone()).unwrap_or_default(),
            path: q.ask.as_ref().and_then(|a| a.path.as_ref().map(|p| p.raw.clone())),
            for_secs: limit.0,
            uses: None,
            until_exit: limit.1,
            graphql_mutations: q.mutations.clone().unwrap_or_default(),
        };
        // No grant lifts an admin ask rule: only what waits goes. A
        // GraphQL question is granted its mutations only; one whose
        // mutations are not all known (an unreadable body) has nothing to
        // scope a grant to: only what waits goes.
        let graphql_unscoped = q.ask.as_ref().is_some_and(|a| a.graphql.is_some()) && q.mutations.is_none();
        let grant = if q.ask.as_ref().is_some_and(AskRule::is_admin) || graphql_unscoped { Grant::Once } else { grant };
        let rule = match grant {
            Grant::Once => None,
            Grant::ForSecs(secs) => Some(spec((Some(secs), false))),
            Grant::Always => Some(spec((None, false))),
            Grant::UntilExit => Some(spec((None, true))),
        };
        let (mut added, mut scope) = (None, None);
        if let Some(r) = rule {
            let note = Some(format!("{word}: question {id}"));
            let rid = s.rules.add(&r, now, Some(by), note)?;
            added = Some(rid);
            scope = s.rules.list().last().map(LiveRule::scope);
            s.dirty = true;
        }
        s.event(json!({"event": "approval", "question": id, "host": q.key.host.as_str(), "port": q.key.port,
            "decision": "allow", "answer": word, "by_uid": by, "method": q.method, "path": q.path, "rule": q.key.rule, "grant": format!("{grant:?}"),
            "live_rule": added, "scope": scope, "requests": q.count}));
        drop(s);
        self.wake();
        Ok(added)
    }

    /// A person says no to question `id`.
    pub fn reject(&self, id: u64, by: u32) -> Result<(), Error> {
        let mut s = self.lock();
        let q = s.questions.iter_mut().find(|q| q.id == id).ok_or(Error::NoQuestion(id))?;
        if q.answer != Answer::Pending {
            return Err(Error::Answered(id));
        }
        q.answer = Answer::Rejected { by };
        let (host, port, count) = (q.key.host.clone(), q.key.port, q.count);
        s.event(json!({"event": "approval", "question": id, "host": host.as_str(), "port": port,
            "decision": "deny", "answer": "rejected", "by_uid": by, "requests": count}));
        drop(s);
        self.wake();
        Ok(())
    }

    /// Adds a live rule (`by` the admin socket's peer).
    pub fn add_rule(&self, spec: &RuleSpec, by: Option<u32>) -> Result<u64, Error> {
        let mut s = self.lock();
        let now = s.now_ms;
        let id = s.rules.add(spec, now, by, None)?;
        let text = s.rules.list().last().map(|r| r.to_string());
        let scope = s.rules.list().last().map(LiveRule::scope);
        s.event(json!({"event": "live", "change": "added", "rule": text, "scope": scope, "by_uid": by}));
        s.dirty = true;
        drop(s);
        self.wake();
        Ok(id)
    }

    pub fn remove_rule(&self, id: u64, by: Option<u32>) -> Result<(), Error> {
        let mut s = self.lock();
        let r = s.rules.remove(id)?;
        s.event(json!({"event": "live", "change": "removed", "rule": r.to_string(), "by_uid": by}));
        s.dirty = true;
        Ok(())
    }

    pub fn reset(&self, by: Option<u32>) {
        let mut s = self.lock();
        let n = s.rules.list().len();
        s.rules.reset();
        s.event(json!({"event": "live", "change": "reset", "removed": n, "by_uid": by}));
        s.dirty = true;
    }

    /// A copy of the live rules and the clock, for `sbx policy ls`.
    pub fn rules(&self) -> (LiveRules, u64) {
        let s = self.lock();
        (s.rules.clone(), s.now_ms)
    }

    /// The persisted form if anything changed since last asked.
    pub fn take_dirty(&self) -> Option<String> {
        let mut s = self.lock();
        std::mem::take(&mut s.dirty).then(|| s.rules.to_json())
    }

    /// The persisted form now.
    pub fn persisted(&self) -> String {
        self.lock().rules.to_json()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> HostName {
        HostName::parse(s).unwrap()
    }

    fn spec(action: &str, h: &str) -> RuleSpec {
        RuleSpec {
            action: action.into(),
            host: h.into(),
            methods: vec![],
            path: None,
            for_secs: None,
            uses: None,
            until_exit: false,
            graphql_mutations: vec![],
        }
    }

    fn pat(p: &str) -> PathPattern {
        PathPattern::parse(p).unwrap()
    }

    #[test]
    fn path_patterns_match_segment_by_segment() {
        let merge = pat("/repos/*/*/pulls/*/merge");
        for yes in [
            "/repos/o/r/pulls/1/merge",
            "/repos/o/r/pulls/1/merge/",
            "/repos/o/./r/pulls/1/merge",
            "/repos/o/x/../r/pulls/1/merge",
        ] {
            assert!(merge.matches(yes, false), "{yes}");
        }
        for no in
            ["/repos/o/pulls/1/merge", "/repos/o/r/pulls/1/merge/x", "/repos//r/pulls/1/merge", "/repos/o/r/pulls/1"]
        {
            assert!(!merge.matches(no, false), "{no}");
        }
        assert!(!merge.matches("/REPOS/o/r/PULLS/1/MERGE", false), "allow rules: case matters");
        assert!(merge.matches("/REPOS/o/r/PULLS/1/MERGE", true), "ask/deny rules: case does not");
        assert!(merge.matches("/repos/o/r/pulls/1/%6derge", true), "escapes of unreserved characters decoded");
        assert!(merge.matches("/repos/o/r%2fx/pulls/1/merge", true), "not normalisable: a strict rule matches");
        assert!(!merge.matches("/repos/o/r%2fx/pulls/1/merge", false), "and an allow rule does not");
        let refs = pat("/repos/*/*/git/refs/**");
        assert!(refs.matches("/repos/o/r/git/refs", true) && refs.matches("/repos/o/r/git/refs/heads/main", true));
        assert!(!refs.matches("/repos/o/r/git/other", true));
        let push = pat("/**/git-receive-pack");
        assert!(push.matches("/o/r.git/git-receive-pack", true) && push.matches("/a/b/c/r.git/git-receive-pack", true));
        assert!(!push.matches("/o/r.git/git-upload-pack", true));
        let all = pat("/**");
        assert!(all.matches("/", false) && all.matches("/x/y", false));
        assert!(pat("/").matches("/", false) && !pat("/").matches("/a", false));
        let info = pat("/**/info/refs?service=git-receive-pack");
        for yes in [
            "/o/r.git/info/refs?service=git-receive-pack",
            "/o/r.git/info/refs?x=1&service=git-receive-pack",
            "/o/r.git/info/refs?service=git%2Dreceive-pack",
            "/o/r.git/info/refs?service=GIT-RECEIVE-PACK",
            "/o/r.git/info/refs?service=%zz",
        ] {
            assert!(info.matches(yes, true), "{yes}");
        }
        assert!(!info.matches("/o/r.git/info/refs?service=git-upload-pack", true));
        assert!(!info.matches("/o/r.git/info/refs", true));
        for bad in ["repos", "/a//b", "/a/", "/a*/b", "/**/x/**", "/a/../b", "/a?b", "/a#b", "/a b", "/a/%2f"] {
            assert!(PathPattern::parse(bad).is_err(), "{bad}");
        }
        assert!(PathPattern::parse(&format!("/{}", "a".repeat(MAX_PATH_PATTERN))).is_err());
    }

    #[test]
    fn grants_expire_and_use_counts_run_out_on_a_fake_clock() {
        let mut rules = LiveRules::default();
        let h = host("api.example.com");
        let req = Request { host: &h, port: 443, http: Some(("GET", "/")) };
        let timed = rules.add(&RuleSpec { for_secs: Some(600), ..spec("allow", "api.example.com") }, 1_000, None, None);
        let id = timed.unwrap();
        assert_eq!(rules.matching(Action::Allow, &req, 1_000).map(|r| r.id), Some(id));
        assert_eq!(rules.matching(Action::Allow, &req, 600_999).map(|r| r.id), Some(id));
        assert!(rules.matching(Action::Allow, &req, 601_000).is_none(), "time up at exactly 600 s");
        assert_eq!(rules.next_expiry(), Some(601_000));
        assert_eq!(rules.expire(601_000).len(), 1);
        assert!(rules.list().is_empty());
        let used =
            rules.add(&RuleSpec { uses: Some(2), ..spec("allow", "api.example.com:443") }, 0, None, None).unwrap();
        assert!(rules.consume(used).is_none(), "one use left");
        assert_eq!(rules.list()[0].limit_text(0), "1 uses left");
        assert_eq!(rules.consume(used).map(|r| r.id), Some(used), "the last use takes it out");
        assert!(rules.matching(Action::Allow, &req, 0).is_none());
        // Through Live: the stack's clock, and the end logged.
        let live = Live::new("sb", LiveRules::default());
        let p = Policy::from_toml("version = 1\n").unwrap();
        live.tick(10_000);
        live.add_rule(&RuleSpec { for_secs: Some(5), ..spec("allow", "api.example.com") }, Some(1000)).unwrap();
        assert!(live.judge(&p, &req).allowed());
        assert_eq!(live.next_due(), Some(15_000));
        live.tick(15_000);
        let j = live.judge(&p, &req);
        assert_eq!(j.verdict, Verdict::Deny, "denied again: {}", j.reason);
        let events = live.take_events();
        assert!(events.iter().any(|e| e["change"] == "expired"), "{events:?}");
        let once = live.add_rule(&RuleSpec { uses: Some(1), ..spec("allow", "api.example.com") }, None).unwrap();
        let j = live.judge(&p, &req);
        assert_eq!(j.grant, Some(once));
        live.consume(once);
        assert!(!live.judge(&p, &req).allowed());
        assert!(live.take_events().iter().any(|e| e["change"] == "used up"));
    }

    #[test]
    fn precedence_live_deny_static_deny_live_allow_ask_static_allow_default() {
        let p = Policy::from_toml(
            "version = 1\napproval = \"ask\"\n[[rule]]\nallow = \"*.a.com\"\n[[rule]]\ndeny = \"bad.a.com\"\n\
             [[rule]]\nask = \"x.a.com\"\nmethods = [\"DELETE\"]\n",
        )
        .unwrap();
        let mut live = LiveRules::default();
        live.add(&spec("deny", "ld.a.com"), 0, None, None).unwrap();
        live.add(&spec("allow", "ld.a.com"), 0, None, None).unwrap();
        live.add(&spec("allow", "bad.a.com"), 0, None, None).unwrap();
        live.add(&spec("allow", "elsewhere.org"), 0, None, None).unwrap();
        let v = |h: &str, m: &str| {
            let h = host(h);
            judge(&p, &live, &Request { host: &h, port: 80, http: Some((m, "/")) }, 0).verdict
        };
        let ask = |h: &str, rule: Option<&str>| {
            Verdict::Ask(QKey { host: host(h), port: 80, rule: rule.map(str::to_string), mutations: None })
        };
        assert_eq!(v("ld.a.com", "GET"), Verdict::Deny, "live deny beats live allow and static allow");
        assert_eq!(v("bad.a.com", "GET"), Verdict::Deny, "static deny beats live allow");
        assert_eq!(v("elsewhere.org", "GET"), Verdict::Allow, "live allow beats the default");
        assert_eq!(v("x.a.com", "DELETE"), ask("x.a.com", Some("rule 3: ask x.a.com ports 80,443 methods DELETE")));
        assert_eq!(v("x.a.com", "GET"), Verdict::Allow, "the ask rule is narrowed");
        assert_eq!(v("nowhere.net", "GET"), ask("nowhere.net", None), "approval = ask holds the default");
        let mut lifted = live.clone();
        lifted.add(&spec("allow", "x.a.com"), 0, None, None).unwrap();
        let h = host("x.a.com");
        let j = judge(&p, &lifted, &Request { host: &h, port: 80, http: Some(("DELETE", "/")) }, 0);
        assert_eq!(j.verdict, Verdict::Allow, "a live allow lifts an ask rule");
        let deny_default = Policy::from_toml("version = 1\n").unwrap();
        let h = host("nowhere.net");
        let j = judge(&deny_default, &live, &Request { host: &h, port: 80, http: None }, 0);
        assert_eq!(j.verdict, Verdict::Deny);
        assert!(j.reason.contains("default deny"), "{}", j.reason);
        // DNS follows: held names resolve, denied ones do not.
        let r = |pol: &Policy, h: &str| judge_resolvable(pol, &live, &host(h), 0).verdict;
        assert_eq!(r(&p, "nowhere.net"), Verdict::Allow);
        assert_eq!(r(&p, "bad.a.com"), Verdict::Deny);
        assert_eq!(r(&p, "ld.a.com"), Verdict::Deny);
        assert_eq!(r(&deny_default, "nowhere.net"), Verdict::Deny);
        assert_eq!(r(&deny_default, "elsewhere.org"), Verdict::Allow);
    }

    #[test]
    fn live_rules_persist_without_until_exit_ones_and_hostile_files_are_refused() {
        let mut rules = LiveRules::default();
        rules.add(&spec("allow", "a.com:8443"), 5, Some(1000), None).unwrap();
        let mut narrowed = spec("deny", "*.b.com");
        narrowed.methods = vec!["POST".into()];
        narrowed.path = Some("/x/*/y".into());
        rules.add(&narrowed, 5, None, Some("note".into())).unwrap();
        rules.add(&RuleSpec { for_secs: Some(60), ..spec("allow", "c.com") }, 5, None, None).unwrap();
        rules.add(&RuleSpec { until_exit: true, ..spec("allow", "d.com") }, 5, None, None).unwrap();
        let text = rules.to_json();
        let (back, expired) = LiveRules::from_json(text.as_bytes(), 10).unwrap();
        assert_eq!(expired, 0);
        assert_eq!(back.list().len(), 3, "until-exit is not kept");
        assert_eq!(back.list(), &rules.list()[..3]);
        let (later, expired) = LiveRules::from_json(text.as_bytes(), 60_005).unwrap();
        assert_eq!((later.list().len(), expired), (2, 1), "expired grants are dropped when read");
        let mut again = back.clone();
        assert_eq!(again.add(&spec("allow", "e.com"), 0, None, None).unwrap(), 5, "ids are never reused");
        let file = |rules: &str| format!("{{\"version\":1,\"next_id\":9,\"rules\":[{rules}]}}");
        let rule = |fields: &str| {
            file(&format!(
                "{{\"id\":1,\"action\":\"allow\",\"host\":\"a.com\",\"ports\":[443],\"limit\":\"always\",\"created_ms\":0{fields}}}"
            ))
        };
        assert!(LiveRules::from_json(rule("").as_bytes(), 0).is_ok());
        for hostile in [
            "not json".to_string(),
            "{\"version\":2,\"next_id\":1,\"rules\":[]}".to_string(),
            rule(",\"extra\":1"),
            rule("").replace("a.com", "127.0.0.1"),
            rule("").replace("a.com", "a.com\\u0000"),
            rule("").replace("\"allow\"", "\"permit\""),
            rule("").replace("[443]", "[0]"),
            rule("").replace("[443]", "[]"),
            rule("").replace("\"always\"", "\"until_exit\""),
            rule("").replace("\"always\"", "{\"uses\":0}"),
            rule(",\"methods\":[\"get\"]"),
            rule(",\"path\":\"/a/../..\""),
            rule("").replace("\"id\":1", "\"id\":9"),
            rule(",\"note\":\"\\u001b[2J\"").to_string(),
            file(&{
                let one = "{\"id\":1,\"action\":\"allow\",\"host\":\"a.com\",\"ports\":[443],\"limit\":\"always\",\"created_ms\":0}";
                format!("{one},{one}")
            }),
        ] {
            assert!(LiveRules::from_json(hostile.as_bytes(), 0).is_err(), "{hostile}");
        }
        let huge = vec![b' '; MAX_LIVE_FILE + 1];
        assert_eq!(LiveRules::from_json(&huge, 0), Err(Error::FileSize(MAX_LIVE_FILE + 1)));
        let mut full = LiveRules::default();
        for _ in 0..MAX_LIVE_RULES {
            full.add(&spec("allow", "a.com"), 0, None, None).unwrap();
        }
        assert_eq!(full.add(&spec("allow", "a.com"), 0, None, None), Err(Error::TooMany));
    }

    #[test]
    fn questions_gather_waiters_and_approval_adds_the_grant_asked_for() {
        let live = Live::new("sb", LiveRules::default());
        live.tick(1_000);
        let key = QKey { host: host("x.com"), port: 443, rule: None, mutations: None };
        let t1 = live.hold(key.clone(), None, None).unwrap();
        let t2 = live.hold(key.clone(), None, None).unwrap();
        assert_eq!(t1.id, t2.id, "one question for one host:port");
        let q = &live.questions()[0];
        assert_eq!((q.count, q.waiting, q.deadline_ms), (2, 2, 1_000 + DEFAULT_HOLD_MS));
        drop(t2);
        assert_eq!(live.questions()[0].waiting, 1);
        assert_eq!(live.approve(t1.id, Grant::ForSecs(600), 1000).unwrap(), Some(1));
        assert_eq!(live.answer(t1.id), Answer::Approved { by: 1000 });
        assert_eq!(live.approve(t1.id, Grant::Once, 1000), Err(Error::Answered(t1.id)));
        assert_eq!(live.rules().0.list()[0].limit, Limit::Until(601_000));
        let events = live.take_events();
        assert!(events.iter().any(|e| e["decision"] == "held") && events.iter().any(|e| e["by_uid"] == 1000));
        // Time-out, and the bounds.
        let other = QKey { host: host("y.com"), port: 80, rule: None, mutations: None };
        let t3 = live.hold(other, None, Some(("GET", "/a"))).unwrap();
        live.tick(1_000 + DEFAULT_HOLD_MS);
        assert_eq!(live.answer(t3.id), Answer::TimedOut);
        assert!(live.take_events().iter().any(|e| e["answer"] == "timed out"));
        let mut tickets = Vec::new();
        for i in 0..MAX_QUESTIONS {
            tickets.push(
                live.hold(QKey { host: host(&format!("h{i}.com")), port: 80, rule: None, mutations: None }, None, None)
                    .unwrap(),
            );
        }
        let over = live.hold(QKey { host: host("over.com"), port: 80, rule: None, mutations: None }, None, None);
        assert!(over.unwrap_err().contains("questions already wait"));
        assert_eq!(live.reject(tickets[0].id, 0), Ok(()));
        assert_eq!(live.reject(999, 0), Err(Error::NoQuestion(999)));
    }

    #[test]
    fn learning_answers_yes_at_once_until_exit_and_records_it() {
        let live = Live::new("sb", LiveRules::default());
        live.set_learn(true);
        let key = QKey { host: host("new.com"), port: 443, rule: None, mutations: None };
        let t = live.hold(key, None, Some(("GET", "/a"))).unwrap();
        assert_eq!(live.answer(t.id), Answer::Approved { by: 0 });
        let (rules, _) = live.rules();
        assert_eq!(rules.list()[0].limit, Limit::UntilExit);
        assert!(!live.persisted().contains("new.com"), "a learned grant is not kept");
        let events = live.take_events();
        assert!(events.iter().any(|e| e["answer"] == "learned" && e["path"] == "/a"), "{events:?}");
    }

    #[test]
    fn shipped_ask_presets_parse_and_ask_what_they_say() {
        for name in ASK_PRESETS {
            let (rows, graphql_rows) = match *name {
                "github" => (GITHUB, GITHUB_GRAPHQL),
                _ => (GITLAB, GITLAB_GRAPHQL),
            };
            let want: usize =
                rows.iter().map(|r| r.0.len()).sum::<usize>() + graphql_rows.iter().map(|r| r.0.len()).sum::<usize>();
            assert_eq!(ask_preset(name).unwrap().len(), want, "every row of {name} parses");
        }
        let p = Policy::from_toml(
            "version = 1\npreset = \"balanced\"\ninclude = [\"ask:github\", \"ask:gitlab\"]\n[[rule]]\nallow = \"gitlab.com\"\n",
        )
        .unwrap();
        let none = LiveRules::default();
        let v = |h: &str, m: &str, path: &str| {
            let h = host(h);
            judge(&p, &none, &Request { host: &h, port: 443, http: Some((m, path)) }, 0).verdict
        };
        let asks = |h: &str, m: &str, path: &str| matches!(v(h, m, path), Verdict::Ask(_));
        assert!(asks("api.github.com", "PUT", "/repos/o/r/pulls/7/merge"));
        assert!(asks("api.github.com", "DELETE", "/repos/o/r/releases/1"));
        assert!(asks("api.github.com", "POST", "/repos/o/r/git/refs"));
        assert!(asks("api.github.com", "PATCH", "/repos/o/r/git/refs/heads/main"));
        assert!(asks("api.github.com", "PUT", "/repos/o/r/collaborators/eve"));
        assert!(asks("github.com", "POST", "/o/r.git/git-receive-pack"));
        assert!(asks("github.com", "GET", "/o/r.git/info/refs?service=git-receive-pack"));
        assert!(asks("gitlab.com", "PUT", "/api/v4/projects/5/merge_requests/3/merge"));
        assert!(asks("gitlab.com", "POST", "/group/sub/r.git/git-receive-pack"));
        assert_eq!(v("api.github.com", "GET", "/repos/o/r/pulls/7"), Verdict::Allow);
        assert_eq!(v("api.github.com", "POST", "/repos/o/r/issues"), Verdict::Allow);
        assert_eq!(v("github.com", "GET", "/o/r.git/info/refs?service=git-upload-pack"), Verdict::Allow, "fetch");
        assert_eq!(v("github.com", "POST", "/o/r.git/git-upload-pack"), Verdict::Allow, "fetch");
        assert!(terminates(&p, &none, &host("api.github.com"), 443), "asked hosts are terminated");
        let err = |t: &str| Policy::from_toml(t).unwrap_err().to_string();
        assert!(err("version = 1\ninclude = [\"ask:nope\"]").contains("Unknown include"));
        assert!(err("version = 1\napproval = \"maybe\"").contains("Unknown approval"));
        assert!(err("version = 1\n[[rule]]\nallow = \"a.com\"\npath = \"/x\"").contains("for ask rules"));
        assert!(err("version = 1\n[[rule]]\nask = \"a.com\"\npath = \"x\"").contains("path pattern"));
        assert!(err("version = 1\n[[rule]]\nask = \"a.com\"\nallow = \"a.com\"").contains("exactly one"));
    }

    #[test]
    fn graphql_ask_rules_hold_listed_mutations_and_let_reads_through() {
        let p = Policy::from_toml(
            "version = 1\npreset = \"balanced\"\ninclude = [\"ask:github\", \"ask:gitlab\"]\n[[rule]]\nallow = \"gitlab.com\"\n\
             [[rule]]\nask = \"api.example.com\"\nmethods = [\"POST\"]\npath = \"/gql\"\ngraphql_mutations = [\"*\"]\n\
             [[rule]]\nallow = \"api.example.com\"\n",
        )
        .unwrap();
        let none = LiveRules::default();
        let body = |q: &str| graphql::scan_body(&serde_json::to_vec(&json!({ "query": q })).unwrap());
        let j = |h: &str, m: &str, path: &str, b: Option<&graphql::Scan>| {
            let h = host(h);
            judge_body(&p, &none, &Request { host: &h, port: 443, http: Some((m, path)) }, b, 0)
        };
        let merge = body("mutation { a: mergePullRequest(input: {pullRequestId: \"1\"}) { clientMutationId } }");
        let read = body("query { viewer { login } }");
        // Without the body: held, marked so that the stack reads it.
        let head = j("api.github.com", "POST", "/graphql", None);
        assert!(matches!(head.verdict, Verdict::Ask(_)) && head.needs_body, "{head:?}");
        assert!(head.reason.contains("if its body is one of its GraphQL mutations"), "{}", head.reason);
        let held = j("api.github.com", "POST", "/graphql", Some(&merge));
        assert!(matches!(held.verdict, Verdict::Ask(_)) && !held.needs_body, "{held:?}");
        assert_eq!(held.detail.as_deref(), Some("mutation mergePullRequest"));
        assert!(held.reason.contains("ask:github graphql merge"), "{}", held.reason);
        assert_eq!(j("api.github.com", "POST", "/graphql", Some(&read)).verdict, Verdict::Allow, "a read goes");
        let add_star = body("mutation { addStar(input: {starrableId: \"1\"}) { clientMutationId } }");
        assert_eq!(j("api.github.com", "POST", "/graphql", Some(&add_star)).verdict, Verdict::Allow, "not listed");
        let del = body("mutation { deleteRef(input: {refId: \"1\"}) { clientMutationId } }");
        assert!(j("api.github.com", "POST", "/graphql", Some(&del)).reason.contains("graphql delete"));
        // Unreadable bodies are held (fail closed).
        let chunked = Err(graphql::Error::Chunked);
        assert!(matches!(j("api.github.com", "POST", "/graphql", Some(&chunked)).verdict, Verdict::Ask(_)));
        assert!(matches!(j("api.github.com", "POST", "/graphql", Some(&body("mutation {"))).verdict, Verdict::Ask(_)));
        // A GET's query= parameter needs no body.
        let get = j("api.github.com", "GET", "/graphql?query=mutation%7BmergePullRequest%7Bx%7D%7D", None);
        assert!(matches!(get.verdict, Verdict::Ask(_)) && !get.needs_body);
        assert_eq!(j("api.github.com", "GET", "/graphql?query=%7Bviewer%7Blogin%7D%7D", None).verdict, Verdict::Allow);
        // GitLab, and a rule of the policy file with "*".
        let accept = body("mutation { mergeRequestAccept(input: {projectPath: \"a/b\", iid: \"1\"}) { errors } }");
        assert!(matches!(j("gitlab.com", "POST", "/api/graphql", Some(&accept)).verdict, Verdict::Ask(_)));
        let note = body("mutation { destroyNote(input: {id: \"1\"}) { errors } }");
        assert!(matches!(j("gitlab.com", "POST", "/api/graphql", Some(&note)).verdict, Verdict::Ask(_)));
        assert_eq!(j("gitlab.com", "POST", "/api/graphql", Some(&read)).verdict, Verdict::Allow);
        assert!(matches!(j("api.example.com", "POST", "/gql", Some(&add_star)).verdict, Verdict::Ask(_)));
        assert_eq!(j("api.example.com", "POST", "/gql", Some(&read)).verdict, Verdict::Allow);
        // Other paths never wait for a body.
        let rest = j("api.github.com", "POST", "/repos/o/r/issues", None);
        assert!(rest.verdict == Verdict::Allow && !rest.needs_body);
        let err = |t: &str| Policy::from_toml(t).unwrap_err().to_string();
        assert!(err("version = 1\n[[rule]]\nallow = \"a.com\"\ngraphql_mutations = [\"x\"]").contains("for ask rules"));
        assert!(err("version = 1\n[[rule]]\nask = \"a.com\"\ngraphql_mutations = [\"a-b\"]").contains("mutation name"));
        assert!(err("version = 1\n[[rule]]\nask = \"a.com\"\ngraphql_mutations = []").contains("from 1 to"));
    }

    /// A GraphQL request's body scanned, as the stack gives it.
    fn gql(q: &str) -> graphql::Scan {
        graphql::scan_body(&serde_json::to_vec(&json!({ "query": q })).unwrap())
    }

    /// Judges a POST /graphql to api.github.com:443 with `body`; a held
    /// one is held as the stack holds it.
    fn post_gql(p: &Policy, live: &Arc<Live>, body: Option<&graphql::Scan>) -> (Judgement, Option<Ticket>) {
        let h = host("api.github.com");
        let req = Request { host: &h, port: 443, http: Some(("POST", "/graphql")) };
        let j = live.judge_body(p, &req, body);
        let t = match (&j.verdict, j.needs_body) {
            (Verdict::Ask(key), false) => Some(
                live.hold_graphql(key.clone(), j.ask.clone(), req.http, j.detail.as_deref(), j.mutations.clone())
                    .unwrap(),
            ),
            _ => None,
        };
        (j, t)
    }

    #[test]
    fn a_graphql_grant_is_scoped_to_the_mutations_its_question_found() {
        let p = Policy::from_toml("version = 1\npreset = \"balanced\"\ninclude = [\"ask:github\"]\n").unwrap();
        let live = Live::new("sb", LiveRules::default());
        let merge = gql("mutation { mergePullRequest(input: {}) { clientMutationId } }");
        let (j, t) = post_gql(&p, &live, Some(&merge));
        assert_eq!(j.mutations, Some(vec!["mergePullRequest".to_string()]), "{j:?}");
        let rid = live.approve(t.unwrap().id, Grant::ForSecs(600), 1000).unwrap().expect("a grant");
        let (rules, _) = live.rules();
        let r = rules.list().iter().find(|r| r.id == rid).unwrap();
        assert_eq!(r.scope(), "graphql mutation mergePullRequest on api.github.com:443/graphql (POST,GET)");
        assert!(r.to_string().ends_with("graphql mutations mergePullRequest"), "{r}");
        let go = |q: &str| post_gql(&p, &live, Some(&gql(q))).0;
        // The same mutation goes; with an unlisted one too (the rule is lifted).
        assert_eq!(go("mutation { mergePullRequest(input: {}) { x } }").grant, Some(rid));
        let with_star = go("mutation { mergePullRequest(input: {}) { x } addStar(input: {}) { x } }");
        assert!(with_star.allowed() && with_star.reason.contains("granted by live #"), "{with_star:?}");
        // Another listed mutation is asked, alone or beside the granted one.
        for q in [
            "mutation { deleteRepository(input: {}) { x } }",
            "mutation { mergePullRequest(input: {}) { x } deleteRef(input: {}) { x } }",
            "mutation { a: mergePullRequest(input: {}) { x } } mutation B { enqueuePullRequest(input: {}) { x } }",
            // Case compared for a grant (the ask rule compares without).
            "mutation { mergepullrequest(input: {}) { x } }",
            // Unknown fields: never covered by a grant.
            "mutation { mergePullRequest(input: {}) { x } ...F } fragment F on Mutation { deleteRef { x } }",
        ] {
            assert!(matches!(go(q).verdict, Verdict::Ask(_)), "{q}");
        }
        let unreadable = Err(graphql::Error::Chunked);
        assert!(matches!(post_gql(&p, &live, Some(&unreadable)).0.verdict, Verdict::Ask(_)));
        // Reads are unaffected.
        assert!(go("query { viewer { login } }").allowed());
        // Kept with the sandbox as scoped as it was made.
        let (back, _) = LiveRules::from_json(live.persisted().as_bytes(), 0).unwrap();
        assert_eq!(back.list()[0].graphql, rules.list()[0].graphql);
        assert!(back.list()[0].graphql.is_some());
    }

    #[test]
    fn a_graphql_question_whose_mutations_are_unknown_gets_no_lasting_grant() {
        let p = Policy::from_toml("version = 1\npreset = \"balanced\"\ninclude = [\"ask:github\"]\n").unwrap();
        let live = Live::new("sb", LiveRules::default());
        let (j, t) = post_gql(&p, &live, Some(&Err(graphql::Error::Chunked)));
        assert!(matches!(j.verdict, Verdict::Ask(_)) && j.mutations.is_none(), "{j:?}");
        assert_eq!(live.approve(t.unwrap().id, Grant::Always, 1000).unwrap(), None, "only what waits goes");
        assert!(live.rules().0.list().is_empty());
        let merge = gql("mutation { mergePullRequest(input: {}) { x } }");
        assert!(matches!(post_gql(&p, &live, Some(&merge)).0.verdict, Verdict::Ask(_)));
    }

    #[test]
    fn a_graphql_grant_to_a_host_the_policy_does_not_allow_waits_for_the_body() {
        let p = Policy::from_toml(
            "version = 1\npreset = \"locked\"\n[[rule]]\nask = \"api.github.com\"\npath = \"/graphql\"\n\
             graphql_mutations = [\"createIssue\"]\n",
        )
        .unwrap();
        let mut rules = LiveRules::default();
        let scoped = RuleSpec { graphql_mutations: vec!["createIssue".into()], ..spec("allow", "api.github.com") };
        rules.add(&scoped, 0, None, None).unwrap();
        let h = host("api.github.com");
        let req = Request { host: &h, port: 443, http: Some(("POST", "/graphql")) };
        let head = judge(&p, &rules, &req, 0);
        assert!(!head.allowed() && head.needs_body, "{head:?}");
        let create = gql("mutation { createIssue(input: {}) { x } }");
        assert!(judge_body(&p, &rules, &req, Some(&create), 0).allowed());
        let other = gql("mutation { addStar(input: {}) { x } }");
        assert_eq!(judge_body(&p, &rules, &req, Some(&other), 0).verdict, Verdict::Deny, "only createIssue");
        assert_eq!(judge_body(&p, &rules, &req, Some(&gql("{ viewer { login } }")), 0).verdict, Verdict::Deny);
        // Scoped rules are not blanket: connections are terminated to read them.
        assert!(terminates(&p, &rules, &h, 443));
    }

    #[test]
    fn a_live_deny_of_a_graphql_mutation_denies_that_mutation_not_the_host() {
        let p = Policy::from_toml("version = 1\npreset = \"balanced\"\n").unwrap();
        let mut rules = LiveRules::default();
        let deny = RuleSpec {
            path: Some("/graphql".into()),
            graphql_mutations: vec!["delete*".into()],
            for_secs: Some(600),
            ..spec("deny", "api.github.com")
        };
        let id = rules.add(&deny, 0, None, None).unwrap();
        assert_eq!(rules.list()[0].scope(), "graphql mutation delete* on api.github.com:80,443/graphql");
        let h = host("api.github.com");
        let req = |m: &'static str, t: &'static str| Request { host: &h, port: 443, http: Some((m, t)) };
        let j = |r: &Request<'_>, b: Option<&graphql::Scan>| judge_body(&p, &rules, r, b, 1000);
        let head = j(&req("POST", "/graphql"), None);
        assert!(head.verdict == Verdict::Deny && head.needs_body, "fails closed until the body is read: {head:?}");
        let del = gql("mutation { createIssue(input: {}) { x } DeleteRepository(input: {}) { x } }");
        let d = j(&req("POST", "/graphql"), Some(&del));
        assert!(d.verdict == Verdict::Deny && d.reason.contains(&format!("live #{id}")), "{d:?}");
        assert_eq!(j(&req("POST", "/graphql"), Some(&Err(graphql::Error::Chunked))).verdict, Verdict::Deny);
        assert!(j(&req("POST", "/graphql"), Some(&gql("mutation { createIssue(input: {}) { x } }"))).allowed());
        assert!(j(&req("POST", "/graphql"), Some(&gql("{ viewer { login } }"))).allowed());
        assert!(j(&req("GET", "/graphql?query=%7Bviewer%7Blogin%7D%7D"), None).allowed());
        let get_del = j(&req("GET", "/graphql?query=mutation%7BdeleteRef%7Bx%7D%7D"), None);
        assert_eq!(get_del.verdict, Verdict::Deny);
        // The rest of the host: not denied, nothing waited for.
        let rest = j(&req("POST", "/repos/o/r/issues"), None);
        assert!(rest.allowed() && !rest.needs_body, "{rest:?}");
        assert_eq!(judge_reachable(&p, &rules, &h, 443, 1000).verdict, Verdict::Allow);
        assert_eq!(judge_resolvable(&p, &rules, &h, 1000).verdict, Verdict::Allow);
        // Without a path it would deny every unreadable POST of the host.
        let blanket = RuleSpec { path: None, ..deny };
        assert!(matches!(rules.add(&blanket, 0, None, None), Err(Error::Graphql(e)) if e.contains("needs --path")));
    }
}

#[cfg(test)]
mod admin_tests {
    use super::*;
    use crate::policy::{AdminLayer, AdminRule, Origin};

    fn host(s: &str) -> HostName {
        HostName::parse(s).unwrap()
    }

    fn spec(action: &str, h: &str) -> RuleSpec {
        RuleSpec {
            action: action.into(),
            host: h.into(),
            methods: vec![],
            path: None,
            for_secs: None,
            uses: None,
            until_exit: false,
            graphql_mutations: vec![],
        }
    }

    /// The admin layer of a file's `[[rule]]` tables.
    fn layer(toml_rules: &str) -> AdminLayer {
        #[derive(serde::Deserialize)]
        struct F {
            rule: Vec<AdminRule>,
        }
        let f: F = toml::from_str(toml_rules).unwrap();
        AdminLayer::parse(f.rule, "abc".into()).unwrap()
    }

    const ADMIN: &str = "[[rule]]\ndeny = \"evil.com\"\n[[rule]]\nask = \"api.github.com\"\nmethods = [\"DELETE\"]\n\
                         [[rule]]\ndeny = \"files.corp\"\npath_prefix = \"/secret/\"\n";

    fn verdict(p: &Policy, live: &LiveRules, h: &str, http: Option<(&str, &str)>) -> Judgement {
        let h = host(h);
        judge(p, live, &Request { host: &h, port: 443, http }, 0)
    }

    #[test]
    fn admin_deny_beats_every_allow_and_admin_ask_holds_what_users_allow() {
        // The user allows everything, by file, preset, --allow and agent.
        let mut p = Policy::from_toml(
            "version = 1\npreset = \"open\"\n[[rule]]\nallow = \"evil.com\"\n[[rule]]\nallow = \"api.github.com\"\n",
        )
        .unwrap();
        p.allow("evil.com").unwrap();
        p.add_agent("claude").unwrap();
        let mut rules = LiveRules::default();
        rules.add(&spec("allow", "evil.com"), 0, Some(1000), None).unwrap();
        rules.add(&spec("allow", "api.github.com"), 0, Some(1000), None).unwrap();
        rules.add(&spec("allow", "files.corp"), 0, Some(1000), None).unwrap();
        // Without the admin layer: allowed.
        assert!(verdict(&p, &rules, "evil.com", None).allowed());
        assert!(verdict(&p, &rules, "api.github.com", Some(("DELETE", "/x"))).allowed());
        rules.set_admin(Arc::new(layer(ADMIN)));
        let j = verdict(&p, &rules, "evil.com", Some(("GET", "/")));
        assert_eq!(j.verdict, Verdict::Deny, "admin deny beats file, preset, --allow and live allows");
        assert_eq!(j.reason, "denied by admin policy rule 1: deny evil.com ports 80,443");
        assert_eq!(verdict(&p, &rules, "evil.com", None).verdict, Verdict::Deny);
        // Narrowed admin deny: that path only; unreadable path fails closed.
        assert_eq!(verdict(&p, &rules, "files.corp", Some(("GET", "/secret/a"))).verdict, Verdict::Deny);
        assert_eq!(verdict(&p, &rules, "files.corp", Some(("GET", "/x/../secret/a"))).verdict, Verdict::Deny);
        assert!(verdict(&p, &rules, "files.corp", Some(("GET", "/public"))).allowed());
        assert_eq!(verdict(&p, &rules, "files.corp", None).verdict, Verdict::Deny, "spliced: cannot see the path");
        // Admin ask: held though the file, the preset and a live allow allow it.
        let j = verdict(&p, &rules, "api.github.com", Some(("DELETE", "/repos/a/b")));
        assert!(
            matches!(&j.verdict, Verdict::Ask(k) if k.rule.as_deref() == Some("admin policy rule 2: ask api.github.com ports 80,443 methods DELETE")),
            "{j:?}"
        );
        assert!(j.ask.as_ref().unwrap().is_admin());
        assert!(verdict(&p, &rules, "api.github.com", Some(("GET", "/"))).allowed(), "narrowed to DELETE");
        // A live deny still beats an admin ask (both narrow).
        rules.add(&spec("deny", "api.github.com"), 0, None, None).unwrap();
        assert_eq!(verdict(&p, &rules, "api.github.com", Some(("DELETE", "/"))).verdict, Verdict::Deny);
        // DNS and connections follow.
        assert_eq!(judge_resolvable(&p, &rules, &host("evil.com"), 0).verdict, Verdict::Deny);
        assert_eq!(judge_resolvable(&p, &rules, &host("files.corp"), 0).verdict, Verdict::Allow, "narrowed");
        assert_eq!(judge_reachable(&p, &rules, &host("evil.com"), 443, 0).verdict, Verdict::Deny);
        assert!(terminates(&p, &rules, &host("files.corp"), 443), "a narrowed admin deny needs each request");
        assert!(terminates(&p, &rules, &host("api.github.com"), 443), "an admin ask needs each request");
        let pass = Policy::from_toml("version = 1\nhttps = \"passthrough\"\n").unwrap();
        assert!(terminates(&pass, &rules, &host("files.corp"), 443));
        assert!(!terminates(&pass, &rules, &host("other.org"), 443), "other hosts as the user set them");
    }

    #[test]
    fn approve_always_and_learn_never_lift_admin_rules() {
        let p = Policy::from_toml("version = 1\napproval = \"ask\"\n").unwrap();
        let mut rules = LiveRules::default();
        rules.set_admin(Arc::new(layer(ADMIN)));
        let live = Live::new("sb", rules);
        // A default-held question about a host the admin denies cannot
        // arise (the deny decides first); approve --always of another
        // host's question adds a live allow that the admin deny still beats.
        let h = host("evil.com");
        let j = live.judge(&p, &Request { host: &h, port: 443, http: None });
        assert_eq!(j.verdict, Verdict::Deny, "admin deny before approval = ask");
        let key = QKey { host: host("evil.com"), port: 443, rule: None, mutations: None };
        let t = live.hold(key, None, None).unwrap();
        assert_eq!(live.approve(t.id, Grant::Always, 1000).unwrap(), Some(1), "a grant was added");
        assert_eq!(live.judge(&p, &Request { host: &h, port: 443, http: None }).verdict, Verdict::Deny);
        // Admin ask: approve --always lets what waits go, adds no grant.
        let gh = host("api.github.com");
        let req = Request { host: &gh, port: 443, http: Some(("DELETE", "/r")) };
        let Verdict::Ask(key) = live.judge(&p, &req).verdict else { panic!("not held") };
        let ask = live.judge(&p, &req).ask;
        let t = live.hold(key.clone(), ask.clone(), Some(("DELETE", "/r"))).unwrap();
        assert_eq!(live.approve(t.id, Grant::Always, 1000).unwrap(), None, "no grant lifts an admin ask");
        assert_eq!(live.answer(t.id), Answer::Approved { by: 1000 });
        assert!(matches!(live.judge(&p, &req).verdict, Verdict::Ask(_)), "the next such request is asked again");
        // --learn answers no admin question.
        live.set_learn(true);
        let t = live.hold(key, ask, Some(("DELETE", "/r"))).unwrap();
        assert_eq!(live.answer(t.id), Answer::Pending, "a person answers admin asks");
        let other =
            live.hold(QKey { host: host("new.org"), port: 443, rule: None, mutations: None }, None, None).unwrap();
        assert_eq!(live.answer(other.id), Answer::Approved { by: 0 }, "others are learned");
        assert_eq!(live.judge(&p, &Request { host: &h, port: 443, http: None }).verdict, Verdict::Deny);
    }

    #[test]
    fn the_admin_layer_is_replaced_whole_logged_and_never_persisted() {
        let live = Live::new("sb", LiveRules::default());
        let p = Policy::from_toml("version = 1\n[[rule]]\nallow = \"evil.com\"\n").unwrap();
        let h = host("evil.com");
        let req = Request { host: &h, port: 443, http: None };
        live.set_admin(layer(ADMIN), "loaded");
        assert_eq!(live.judge(&p, &req).verdict, Verdict::Deny);
        live.admin_error("bad file");
        assert_eq!(live.judge(&p, &req).verdict, Verdict::Deny, "a bad file keeps the last good layer");
        live.set_admin(layer("[[rule]]\nask = \"other.org\"\n"), "reloaded");
        assert!(live.judge(&p, &req).allowed(), "the deny is gone once the file drops it");
        let events = live.take_events();
        let changes: Vec<&str> = events.iter().filter_map(|e| e["change"].as_str()).collect();
        assert_eq!(changes, ["loaded", "refused", "reloaded"]);
        assert!(events.iter().all(|e| e["event"] == "admin_policy"));
        assert_eq!(events[1]["kept_sha256"], "abc");
        assert!(!live.persisted().contains("other.org"), "the admin layer is not a live rule");
        assert_eq!(live.admin().denies.len(), 0);
    }

    #[test]
    fn admin_rules_are_checked_and_conflicts_named() {
        let l = layer(ADMIN);
        assert_eq!(l.denies[0].origin, Origin::Admin(1));
        assert_eq!(l.denies[1].to_string(), "admin policy rule 3: deny files.corp ports 80,443 path /secret/");
        let (pat, ports) = parse_host_port("EVIL.com").unwrap();
        assert_eq!(l.conflict(&pat, &ports).as_deref(), Some("admin policy rule 1: deny evil.com ports 80,443"));
        let (pat, ports) = parse_host_port("*.com").unwrap();
        assert!(l.conflict(&pat, &ports).is_some(), "a wildcard over a denied name");
        let (pat, ports) = parse_host_port("api.github.com:8443").unwrap();
        assert!(l.conflict(&pat, &ports).is_none(), "another port");
        let (pat, ports) = parse_host_port("good.org").unwrap();
        assert!(l.conflict(&pat, &ports).is_none());
        let bad = |t: &str| {
            #[derive(serde::Deserialize)]
            struct F {
                rule: Vec<AdminRule>,
            }
            match toml::from_str::<F>(t) {
                Ok(f) => AdminLayer::parse(f.rule, String::new()).unwrap_err().to_string(),
                Err(e) => e.to_string(),
            }
        };
        assert!(bad("[[rule]]\nallow = \"a.com\"\n").contains("unknown field"));
        assert!(bad("[[rule]]\ndeny = \"a.com\"\nask = \"a.com\"\n").contains("Admin rule 1: give exactly one"));
        assert!(bad("[[rule]]\ndeny = \"127.0.0.1\"\n").contains("Rule 1"));
        assert!(bad("[[rule]]\ndeny = \"a.com\"\nports = [0]\n").contains("port 0"));
        assert!(bad("[[rule]]\nask = \"a.com\"\npath = \"x\"\n").contains("Rule 1"));
    }
}

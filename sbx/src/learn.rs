//! Host side: policy from what a sandbox did — `sbx policy suggest NAME`
//! (rules for what its audit log shows was held, learned with `sbx run
//! --learn`, or denied by default) and `sbx policy test NAME --policy
//! FILE` (its logged requests replayed through a candidate policy with
//! netstack's own decision function, [`netstack::live::judge`]). The audit
//! log's chain is verified first; every name in it is parsed again as a
//! host name and printed escaped (the guest chose them). Allowed requests
//! the log aggregated (counted, not written) are not replayed.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;

use netstack::host::HostName;
use netstack::live::{self, LiveRules, Verdict};
use netstack::policy::Request;
use serde_json::Value;

use crate::commands::CommandError;
use crate::escape;
use crate::policy_doc::SandboxPolicy;
use crate::sandbox::{self, Sandbox};

/// Requests kept for a replay (the rest are counted only).
const MAX_REPLAYED: usize = 100_000;

/// One logged request: host, port, method and target where readable, what
/// was decided, and whether TLS was terminated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    pub host: HostName,
    pub port: u16,
    pub http: Option<(String, String)>,
    /// "allow", "deny" or "held".
    pub decision: String,
    /// The rule that decided, if any (None: the default).
    pub rule: Option<String>,
    /// The answer a held request got: "approved", "learned", ….
    pub answer: Option<String>,
}

/// The requests in audit lines (JSON objects, one per line).
pub fn requests(lines: &str) -> Vec<Logged> {
    let mut out = Vec::new();
    for line in lines.lines() {
        let Ok(Value::Object(v)) = serde_json::from_str::<Value>(line) else { continue };
        let s = |k: &str| v.get(k).and_then(Value::as_str);
        let decision = s("decision").unwrap_or("").to_string();
        let rule = s("rule").map(str::to_string);
        let (name, port, http) = match s("event") {
            Some("http") => {
                let port = if s("tls").is_some() { 443 } else { 80 };
                let http = s("method").zip(s("path")).map(|(m, p)| (m.to_string(), p.to_string()));
                (s("host"), port, http)
            }
            Some("tls") => (s("sni"), 443, None),
            Some("dns") => (s("name"), 0, None),
            Some("approval") => {
                let port = v.get("port").and_then(Value::as_u64).and_then(|p| u16::try_from(p).ok()).unwrap_or(0);
                let http = s("method").zip(s("path")).map(|(m, p)| (m.to_string(), p.to_string()));
                let answer = s("answer").map(str::to_string);
                let Some(host) = s("host").and_then(|h| HostName::parse(h).ok()) else { continue };
                let decision = if answer.is_some() { decision } else { "held".into() };
                out.push(Logged { host, port, http, decision, rule, answer });
                continue;
            }
            _ => continue,
        };
        let Some(host) = name.and_then(|h| HostName::parse(h).ok()) else { continue };
        if decision.is_empty() || out.len() >= MAX_REPLAYED {
            continue;
        }
        out.push(Logged { host, port, http, decision, rule, answer: None });
    }
    out
}

/// The suggested rules (TOML) for `logged`: an allow rule for each host
/// that was held, learned or denied by default, on the ports seen; a note
/// for each ask rule that was answered.
pub fn suggestions(logged: &[Logged]) -> String {
    let mut hosts: BTreeMap<String, (Vec<u16>, u64, Option<String>)> = BTreeMap::new();
    let mut asked: BTreeMap<String, u64> = BTreeMap::new();
    for l in logged {
        if let (Some(rule), Some(_)) = (&l.rule, &l.answer) {
            *asked.entry(rule.clone()).or_default() += 1;
            continue;
        }
        let by_default = l.rule.is_none() && (l.decision == "deny" || l.decision == "held" || l.answer.is_some());
        if !by_default {
            continue;
        }
        let e = hosts.entry(l.host.to_string()).or_default();
        if l.port != 0 && !e.0.contains(&l.port) {
            e.0.push(l.port);
        }
        e.1 += 1;
        if e.2.is_none() {
            e.2 = l.http.as_ref().map(|(m, p)| format!("{m} {}", p.chars().take(80).collect::<String>()));
        }
    }
    let mut out = String::new();
    if hosts.is_empty() && asked.is_empty() {
        return "# nothing was held or denied by default: no rule to suggest\n".into();
    }
    for (host, (mut ports, n, example)) in hosts {
        ports.sort_unstable();
        let example = example.map(|e| format!(", e.g. {}", escape::line(&e))).unwrap_or_default();
        out += &format!("# {n} requests{example}\n[[rule]]\nallow = \"{host}\"\n");
        if !ports.is_empty() && ports != [80, 443] {
            let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
            out += &format!("ports = [{}]\n", ports.join(", "));
        }
        out += "\n";
    }
    for (rule, n) in asked {
        out += &format!("# {} was answered {n} times (keep it, or allow what it asks)\n", escape::line(&rule));
    }
    out
}

/// What `policy` decides for `l` (as the stack would: terminated HTTPS
/// and plain HTTP by request, spliced HTTPS by name; DNS by name).
fn replay(policy: &netstack::policy::Policy, l: &Logged) -> &'static str {
    let none = LiveRules::default();
    let verdict = match (&l.http, l.port) {
        (_, 0) => live::judge_resolvable(policy, &none, &l.host, 0).verdict,
        (Some((m, p)), port) => {
            live::judge(policy, &none, &Request { host: &l.host, port, http: Some((m, p)) }, 0).verdict
        }
        (None, port) if live::terminates(policy, &none, &l.host, port) => {
            live::judge_reachable(policy, &none, &l.host, port, 0).verdict
        }
        (None, port) => live::judge(policy, &none, &Request { host: &l.host, port, http: None }, 0).verdict,
    };
    match verdict {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
        Verdict::Ask(_) => "held",
    }
}

/// Each logged request `policy` would decide differently, counted:
/// (was, would be, what) → count.
pub fn differences(policy: &netstack::policy::Policy, logged: &[Logged]) -> BTreeMap<(String, String, String), u64> {
    let mut out = BTreeMap::new();
    for l in logged.iter().filter(|l| l.answer.is_none()) {
        let now = replay(policy, l);
        if now != l.decision {
            let what = match &l.http {
                Some((m, p)) => format!("{m} {}:{}{}", l.host, l.port, p.chars().take(120).collect::<String>()),
                None if l.port == 0 => format!("DNS {}", l.host),
                None => format!("TLS {}:{}", l.host, l.port),
            };
            *out.entry((l.decision.clone(), now.to_string(), what)).or_default() += 1;
        }
    }
    out
}

/// The verified audit log of sandbox `name`, as text.
fn audit_text(name: &str) -> Result<String, CommandError> {
    let sb = Sandbox::open(&sandbox::home(), name)?;
    let path = sb.audit_log();
    let files = audit::log_files(&path).map_err(|e| CommandError::Read(path.clone(), e.to_string()))?;
    if files.is_empty() {
        return Err(CommandError::NoLog(path, "audit log"));
    }
    audit::verify_files(&files)?;
    let mut text = String::new();
    for f in &files {
        let bytes = std::fs::read(f).map_err(|e| CommandError::Read(f.clone(), e.to_string()))?;
        text.push_str(&String::from_utf8_lossy(&bytes));
    }
    Ok(text)
}

/// `sbx policy suggest NAME`.
pub fn suggest(name: &str) -> Result<ExitCode, CommandError> {
    let logged = requests(&audit_text(name)?);
    io::stdout().lock().write_all(suggestions(&logged).as_bytes()).map_err(CommandError::Stdout)?;
    Ok(ExitCode::SUCCESS)
}

/// `sbx policy test NAME --policy FILE`: exit 0 if nothing would change.
pub fn test(name: &str, file: &Path) -> Result<ExitCode, CommandError> {
    let policy = SandboxPolicy::read(file)?.network;
    let logged = requests(&audit_text(name)?);
    let diff = differences(&policy, &logged);
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{} logged requests replayed; {} would be decided differently", logged.len(), diff.len());
    for ((was, now, what), n) in &diff {
        let _ = writeln!(out, "  {was} -> {now}: {} ({n}x)", escape::line(what));
    }
    Ok(if diff.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use netstack::policy::Policy;

    const LOG: &str = r#"{"event":"dns","name":"api.example.com","decision":"deny","rule":null}
{"event":"http","method":"GET","host":"api.example.com","path":"/v1/x","dst":"198.18.0.1","decision":"deny","rule":null}
{"event":"tls","sni":"cdn.example.net","dst":"198.18.0.2","decision":"held","question":1}
{"event":"approval","question":1,"host":"cdn.example.net","port":443,"decision":"allow","answer":"learned","by_uid":0}
{"event":"http","method":"GET","host":"ok.example.org","path":"/","dst":"198.18.0.3","decision":"allow","rule":"rule 1: allow ok.example.org ports 80,443"}
{"event":"approval","question":2,"host":"api.github.com","port":443,"decision":"allow","answer":"approved","rule":"ask:github merge: ask api.github.com"}
{"event":"http","method":"GET","host":"127.0.0.1","path":"/","decision":"deny"}
not json
"#;

    #[test]
    fn suggestions_allow_what_was_held_learned_or_denied_by_default() {
        let logged = requests(LOG);
        assert!(logged.iter().all(|l| l.host.as_str() != "127.0.0.1"), "names are parsed again");
        let s = suggestions(&logged);
        assert!(s.contains("allow = \"api.example.com\"\nports = [80]"), "{s}");
        assert!(s.contains("allow = \"cdn.example.net\"\nports = [443]"), "{s}");
        assert!(!s.contains("ok.example.org"), "already allowed: {s}");
        assert!(s.contains("ask:github merge") && s.contains("answered 1 times"), "{s}");
        let p = Policy::from_toml(&format!("version = 1\n{s}")).expect("the suggestion is a valid policy");
        assert!(differences(&p, &logged).keys().any(|(was, now, _)| was == "deny" && now == "allow"));
    }

    #[test]
    fn a_candidate_policy_is_replayed_with_the_stacks_decision() {
        let logged = requests(LOG);
        let same = Policy::from_toml("version = 1\n[[rule]]\nallow = \"ok.example.org\"\n").unwrap();
        let d = differences(&same, &logged);
        assert!(d.keys().all(|(_, _, what)| what.contains("cdn.example.net")), "only the held one differs: {d:?}");
        let locked = Policy::from_toml("version = 1\n").unwrap();
        let d = differences(&locked, &logged);
        assert!(d.contains_key(&("allow".into(), "deny".into(), "GET ok.example.org:80/".into())), "{d:?}");
    }
}

//! Host side: the typed audit events ([`Event`]) that netstack and the
//! VMM's file server record, each serialising to exactly the JSON object
//! the log has always held for its kind (so old logs and new lines are
//! one format), and the aggregation kinds the log counts them under.
//!
//! The line on disk is written from the event's JSON object, whose keys
//! serde_json keeps sorted: field order here does not change a byte of
//! it. A field is absent, `null` or a value exactly as before: `Option`
//! fields are left out when `None`; [`Nullable`] fields (`Option<Option>`)
//! are left out when `None` and written `null` when `Some(None)`, for the
//! fields that were `null` rather than absent.
//!
//! Typed: `file` ([`FileOp`]), `dns` ([`Dns`]), `http` and `tls`
//! ([`Exchange`]), `upstream` ([`Upstream`]), `conn_end` ([`ConnEnd`]),
//! `refused` ([`Refused`]), `reclaimed` ([`Reclaimed`]), `timeout`
//! ([`Timeout`]). Every other kind is [`Event::Untyped`] for now (see
//! there): the kinds are named by the host's code either way, and the
//! aggregation of an untyped event reads its JSON as it always did.

use std::fmt;

use serde::{Serialize, Serializer};
use serde_json::{Map, Value};

use crate::{cut, MAX_KIND_PART};

/// A field written `null` (`Some(None)`), with a value, or not at all.
pub type Nullable<T> = Option<Option<T>>;

/// What was decided about an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Allow,
    Deny,
    /// Held on a question to a person (`sbx approve` / `sbx reject`).
    Held,
}

impl Decision {
    fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::Held => "held",
        }
    }
}

/// `{"event":"file",...}`: a shared folder's change or refusal (the VMM's
/// file server).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileOp {
    /// The operation: `create`, `write`, `delete`, `rename`, `chmod`, …
    pub op: String,
    /// The host path (null for a refusal without one).
    pub path: Option<String>,
    pub decision: Decision,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A symlink's target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// A rename's new path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// A chmod's mode, octal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// A truncate's size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// A quota refusal's limit, bytes used and bytes asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asked: Option<u64>,
}

impl FileOp {
    /// An allowed `op` on `path`, no other field.
    pub fn allowed(op: &str, path: String) -> FileOp {
        FileOp {
            op: op.to_string(),
            path: Some(path),
            decision: Decision::Allow,
            reason: None,
            target: None,
            to: None,
            mode: None,
            size: None,
            quota: None,
            used: None,
            asked: None,
        }
    }

    /// A refused `op` on `path`, for `reason`.
    pub fn denied(op: &str, path: Option<String>, reason: String) -> FileOp {
        FileOp { decision: Decision::Deny, path, reason: Some(reason), ..FileOp::allowed(op, String::new()) }
    }
}

/// `{"event":"dns",...}`: a query answered or refused, or one that could
/// not be read (`error`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Dns {
    /// The name asked for (as sent when it is not a host name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Nullable<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The A record given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// The query type answered with no record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qtype: Option<u16>,
    /// Why the query could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `{"event":"http",...}` or `{"event":"tls",...}` ([`Event::Http`],
/// [`Event::Tls`]): one request or TLS connection, built up as the
/// connection judges it (so every field but `dst` is optional).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Exchange {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Nullable<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Nullable<String>,
    /// The request target as sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The path judged, where it differs from `path`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub normalized_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst: Option<String>,
    /// `terminated` (a request inside TLS netstack ended), or why an
    /// upstream TLS connection failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    /// A TLS connection netstack terminated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub terminated: Option<bool>,
    /// A TLS connection spliced through unread.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spliced: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpn: Nullable<String>,
    /// The OAuth session a token refresh was answered for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oauth: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Nullable<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// An ask rule's question, answered yes earlier.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approved: Option<bool>,
    /// What a GraphQL ask rule found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub graphql: Option<String>,
    /// The question the request was held on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub question: Option<u64>,
    /// The credential whose placeholder leaked (a leak attempt).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leak: Option<String>,
    /// A leak found in a response: bytes masked, echoes seen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub masked: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub echoes: Option<u32>,
    /// The credentials injected, comma-separated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// The response status (null: none came).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Nullable<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_up: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_down: Option<u64>,
    /// The time limit that ended the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// An address an upstream name resolved to that is not global.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RefusedAddr {
    pub addr: String,
    pub class: String,
}

/// `{"event":"upstream",...}`: connecting upstream failed or was refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Upstream {
    pub dst: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub name: Option<String>,
    pub error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<Vec<RefusedAddr>>,
}

/// `{"event":"conn_end",...}`: a guest connection's totals.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConnEnd {
    pub dst: String,
    pub port: u16,
    pub name: Option<String>,
    pub upstream: Option<String>,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// `{"event":"refused",...}`: a dropped frame or connection (`what`,
/// whose first word is its aggregation kind).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Refused {
    pub what: String,
    /// A TCP reset was sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reset: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The named limit reached, and refusals since the last such line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// A forwarded (published) port's connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

/// `{"event":"reclaimed",...}`: an idle connection closed to make room.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reclaimed {
    pub dst: String,
    pub port: u16,
    pub reason: String,
}

/// `{"event":"timeout",...}`: a connection's time limit fired.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timeout {
    pub limit: String,
    pub limit_ms: u64,
    pub dst: String,
    pub port: u16,
    pub name: Option<String>,
    pub reason: String,
}

/// One audit event, as [`crate::AuditLog::record`] takes it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    File(FileOp),
    Dns(Dns),
    Http(Exchange),
    Tls(Exchange),
    Upstream(Upstream),
    ConnEnd(ConnEnd),
    Refused(Refused),
    Reclaimed(Reclaimed),
    Timeout(Timeout),
    /// Transitional: a kind not typed yet, as the JSON object it always
    /// was (its `event` field names the kind). Left: netstack's `live`,
    /// `approval`, `admin_policy`, `oauth`, `publish`, `unpublish`,
    /// `port_forward`, `port_forward_end`; the CLI's `run`, `secret` and
    /// `clone` lines. Anything else must be a typed variant. Not an object:
    /// refused by `record` ([`crate::Error::NotAnObject`]).
    Untyped(Value),
}

/// `inner`'s fields after `event`.
#[derive(Serialize)]
struct Tagged<'a, T> {
    event: &'static str,
    #[serde(flatten)]
    inner: &'a T,
}

impl Serialize for Event {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        fn tagged<S: Serializer, T: Serialize>(s: S, event: &'static str, inner: &T) -> Result<S::Ok, S::Error> {
            Tagged { event, inner }.serialize(s)
        }
        match self {
            Event::File(e) => tagged(s, "file", e),
            Event::Dns(e) => tagged(s, "dns", e),
            Event::Http(e) => tagged(s, "http", e),
            Event::Tls(e) => tagged(s, "tls", e),
            Event::Upstream(e) => tagged(s, "upstream", e),
            Event::ConnEnd(e) => tagged(s, "conn_end", e),
            Event::Refused(e) => tagged(s, "refused", e),
            Event::Reclaimed(e) => tagged(s, "reclaimed", e),
            Event::Timeout(e) => tagged(s, "timeout", e),
            Event::Untyped(v) => v.serialize(s),
        }
    }
}

/// The event's JSON object, as the log writes it (without the chain's
/// keys).
impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let json = serde_json::to_value(self).map_err(|_| fmt::Error)?;
        write!(f, "{json}")
    }
}

impl From<FileOp> for Event {
    fn from(e: FileOp) -> Event {
        Event::File(e)
    }
}

impl From<Dns> for Event {
    fn from(e: Dns) -> Event {
        Event::Dns(e)
    }
}

/// `{event}/{class}`, the event's name cut as kinds are (the class is
/// made of parts already cut).
fn kind(event: &str, class: &str) -> String {
    format!("{}/{class}", cut(event, MAX_KIND_PART))
}

impl Event {
    /// The `event` field: the kind's name.
    pub fn name(&self) -> Option<&str> {
        Some(match self {
            Event::File(_) => "file",
            Event::Dns(_) => "dns",
            Event::Http(_) => "http",
            Event::Tls(_) => "tls",
            Event::Upstream(_) => "upstream",
            Event::ConnEnd(_) => "conn_end",
            Event::Refused(_) => "refused",
            Event::Reclaimed(_) => "reclaimed",
            Event::Timeout(_) => "timeout",
            Event::Untyped(v) => return v.get("event").and_then(Value::as_str),
        })
    }

    fn decision(&self) -> Option<Decision> {
        match self {
            Event::File(e) => Some(e.decision),
            Event::Dns(e) => e.decision,
            Event::Http(e) | Event::Tls(e) => e.decision,
            Event::Upstream(e) => e.decision,
            _ => None,
        }
    }

    /// The kind a refusal is counted under, or None if this is not one
    /// (see [`crate::refusal_kind`], which this equals on the event's
    /// JSON).
    pub fn refusal_kind(&self) -> Option<String> {
        let event = self.name().unwrap_or("?");
        match self {
            Event::Untyped(Value::Object(m)) => crate::refusal_kind(m),
            Event::Untyped(_) => None,
            Event::Http(Exchange { leak: Some(_), decision: Some(Decision::Deny), .. }) => Some(kind(event, "leak")),
            Event::File(f) if f.decision == Decision::Deny => {
                Some(kind(event, &format!("{}/deny", cut(&f.op, MAX_KIND_PART))))
            }
            _ if self.decision() == Some(Decision::Deny) => Some(kind(event, "deny")),
            Event::Refused(r) => Some(kind(event, cut(r.what.split_whitespace().next().unwrap_or("?"), MAX_KIND_PART))),
            Event::Dns(Dns { error: Some(_), .. }) => Some(kind(event, "error")),
            _ => None,
        }
    }

    /// The kind of an allowed change to a shared file, if this is one
    /// (see [`crate::change_kind`]).
    pub fn change_kind(&self) -> Option<String> {
        match self {
            Event::Untyped(Value::Object(m)) => crate::change_kind(m),
            Event::File(f) if f.decision != Decision::Deny => Some(format!("file/{}/allow", cut(&f.op, MAX_KIND_PART))),
            _ => None,
        }
    }

    /// The kind of an event that is neither a refusal nor a change (see
    /// [`crate::allowed_kind`]).
    pub fn allowed_kind(&self) -> String {
        let event = cut(self.name().unwrap_or("?"), MAX_KIND_PART);
        match self {
            Event::Untyped(Value::Object(m)) => crate::allowed_kind(m),
            Event::Dns(_) | Event::Http(_) | Event::Tls(_) => format!("{event}/allow"),
            _ => match self.decision() {
                Some(d) => format!("{event}/{}", d.as_str()),
                None if matches!(self, Event::Upstream(_)) => format!("{event}/error"),
                None => event.to_string(),
            },
        }
    }

    /// Whether a refusal of this event is a leak attempt.
    pub fn is_leak(&self) -> bool {
        self.refusal_kind().is_some_and(|k| crate::is_leak_kind(&k))
    }

    /// The request or TLS connection of an `http` or `tls` event, to
    /// add to as it is judged.
    pub fn exchange_mut(&mut self) -> Option<&mut Exchange> {
        match self {
            Event::Http(e) | Event::Tls(e) => Some(e),
            _ => None,
        }
    }

    /// The event as its JSON object, or None if it is not one.
    pub(crate) fn fields(&self) -> Option<Map<String, Value>> {
        match serde_json::to_value(self) {
            Ok(Value::Object(m)) => Some(m),
            _ => None,
        }
    }
}

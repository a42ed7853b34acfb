//! Host side, tests: each typed audit event next to the `json!` object
//! the code wrote for it before events were typed (copied from those
//! sites: netstack's conn.rs, stack.rs, limits.rs, forward.rs and the
//! VMM's fs/server.rs), one of each shape.

use audit::{ConnEnd, Decision, Dns, Event, Exchange, FileOp, Reclaimed, Refused, RefusedAddr, Timeout, Upstream};
use serde_json::{json, Value};

fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

/// (typed, as written before).
pub fn table() -> Vec<(Event, Value)> {
    let deny = Some(Decision::Deny);
    let allow = Some(Decision::Allow);
    let x = Exchange::default;
    vec![
        // vmm/src/fs/server.rs
        (
            Event::File(FileOp::denied("open", s("/w/.env"), "hidden".into())),
            json!({"event": "file", "op": "open", "path": "/w/.env", "decision": "deny", "reason": "hidden"}),
        ),
        (
            Event::File(FileOp::denied("mknod", None, "special".into())),
            json!({"event": "file", "op": "mknod", "path": null, "decision": "deny", "reason": "special"}),
        ),
        (
            Event::File(FileOp {
                quota: Some(10),
                used: Some(9),
                asked: Some(4),
                ..FileOp::denied("write", s("/w/big"), "over quota".into())
            }),
            json!({"event": "file", "op": "write", "path": "/w/big", "decision": "deny", "reason": "over quota",
                "quota": 10, "used": 9, "asked": 4}),
        ),
        (
            Event::File(FileOp::allowed("write", "/w/a".into())),
            json!({"event": "file", "op": "write", "path": "/w/a", "decision": "allow"}),
        ),
        (
            Event::File(FileOp { target: s("../x"), ..FileOp::allowed("symlink", "/w/l".into()) }),
            json!({"event": "file", "op": "symlink", "path": "/w/l", "target": "../x", "decision": "allow"}),
        ),
        (
            Event::File(FileOp { mode: s("755"), ..FileOp::allowed("chmod", "/w/a".into()) }),
            json!({"event": "file", "op": "chmod", "path": "/w/a", "mode": "755", "decision": "allow"}),
        ),
        (
            Event::File(FileOp { size: Some(0), ..FileOp::allowed("truncate", "/w/a".into()) }),
            json!({"event": "file", "op": "truncate", "path": "/w/a", "size": 0, "decision": "allow"}),
        ),
        (
            Event::File(FileOp { to: s("/w/b"), ..FileOp::allowed("rename", "/w/a".into()) }),
            json!({"event": "file", "op": "rename", "path": "/w/a", "to": "/w/b", "decision": "allow"}),
        ),
        // netstack/src/stack.rs: DNS
        (Event::Dns(Dns { error: s("short"), ..Dns::default() }), json!({"event": "dns", "error": "short"})),
        (
            Event::Dns(Dns { name: s("1.2.3.4"), decision: deny, reason: s("not a host name"), ..Dns::default() }),
            json!({"event": "dns", "name": "1.2.3.4", "decision": "deny", "reason": "not a host name"}),
        ),
        (
            Event::Dns(Dns { name: s("evil.test"), decision: deny, rule: Some(None), ..Dns::default() }),
            json!({"event": "dns", "name": "evil.test", "decision": "deny", "rule": null}),
        ),
        (
            Event::Dns(Dns {
                name: s("a.test"),
                decision: allow,
                rule: Some(s("allow a.test")),
                answer: s("10.0.2.100"),
                ..Dns::default()
            }),
            json!({"event": "dns", "name": "a.test", "decision": "allow", "rule": "allow a.test", "answer": "10.0.2.100"}),
        ),
        (
            Event::Dns(Dns { name: s("a.test"), decision: allow, rule: Some(None), qtype: Some(28), ..Dns::default() }),
            json!({"event": "dns", "name": "a.test", "decision": "allow", "rule": null, "qtype": 28}),
        ),
        // netstack/src/conn.rs: requests
        (
            Event::Http(Exchange { decision: deny, reason: s("bad head"), ..x() }),
            json!({"event": "http", "decision": "deny", "reason": "bad head"}),
        ),
        (
            Event::Http(Exchange {
                method: s("GET"),
                host: Some(s("a.test")),
                path: s("/a/../b"),
                normalized_path: s("/b"),
                dst: s("10.0.2.100:443"),
                tls: s("terminated"),
                rule: Some(s("allow a.test")),
                decision: allow,
                credential: s("gh"),
                status: Some(Some(200)),
                bytes_up: Some(120),
                bytes_down: Some(5000),
                ..x()
            }),
            json!({"event": "http", "method": "GET", "host": "a.test", "path": "/a/../b", "dst": "10.0.2.100:443",
                "normalized_path": "/b", "tls": "terminated", "rule": "allow a.test", "decision": "allow",
                "credential": "gh", "status": 200, "bytes_up": 120, "bytes_down": 5000}),
        ),
        (
            Event::Http(Exchange {
                method: s("POST"),
                host: Some(s("api.github.com")),
                path: s("/graphql"),
                dst: s("10.0.2.101:443"),
                graphql: s("mutation mergePullRequest"),
                rule: Some(s("ask api.github.com")),
                decision: Some(Decision::Held),
                question: Some(3),
                ..x()
            }),
            json!({"event": "http", "method": "POST", "host": "api.github.com", "path": "/graphql",
                "dst": "10.0.2.101:443", "graphql": "mutation mergePullRequest", "rule": "ask api.github.com",
                "decision": "held", "question": 3}),
        ),
        (
            Event::Http(Exchange {
                method: s("GET"),
                host: Some(s("a.test")),
                path: s("/"),
                dst: s("10.0.2.100:80"),
                rule: Some(None),
                approved: Some(true),
                decision: allow,
                status: Some(None),
                bytes_up: Some(40),
                timeout: s("response_head"),
                ..x()
            }),
            json!({"event": "http", "method": "GET", "host": "a.test", "path": "/", "dst": "10.0.2.100:80",
                "rule": null, "approved": true, "decision": "allow", "status": null, "bytes_up": 40,
                "timeout": "response_head"}),
        ),
        (
            Event::Http(Exchange {
                host: Some(s("evil.test")),
                dst: s("10.0.2.102:443"),
                decision: deny,
                leak: s("gh"),
                masked: Some(40),
                echoes: Some(2),
                reason: s("echoed"),
                ..x()
            }),
            json!({"event": "http", "host": "evil.test", "dst": "10.0.2.102:443", "decision": "deny", "leak": "gh",
                "masked": 40, "echoes": 2, "reason": "echoed"}),
        ),
        (
            Event::Http(Exchange {
                method: s("POST"),
                host: Some(s("auth.test")),
                path: s("/token"),
                dst: s("10.0.2.103:443"),
                oauth: s("claude"),
                decision: allow,
                status: Some(None),
                bytes_down: Some(70),
                ..x()
            }),
            json!({"event": "http", "method": "POST", "host": "auth.test", "path": "/token", "dst": "10.0.2.103:443",
                "oauth": "claude", "decision": "allow", "status": null, "bytes_down": 70}),
        ),
        (
            Event::Tls(Exchange {
                dst: s("10.0.2.100:443"),
                host: Some(None),
                question: Some(4),
                decision: deny,
                reason: s("rejected"),
                ..x()
            }),
            json!({"event": "tls", "dst": "10.0.2.100:443", "host": null, "question": 4, "decision": "deny", "reason": "rejected"}),
        ),
        // TLS
        (
            Event::Tls(Exchange {
                sni: Some(s("a.test")),
                dst: s("10.0.2.100:443"),
                rule: Some(s("allow a.test")),
                decision: allow,
                spliced: Some(true),
                ..x()
            }),
            json!({"event": "tls", "sni": "a.test", "dst": "10.0.2.100:443", "rule": "allow a.test", "decision": "allow",
                "spliced": true}),
        ),
        (
            Event::Tls(Exchange {
                sni: Some(s("a.test")),
                dst: s("10.0.2.100:443"),
                rule: Some(None),
                alpn: Some(None),
                decision: allow,
                terminated: Some(true),
                ..x()
            }),
            json!({"event": "tls", "sni": "a.test", "dst": "10.0.2.100:443", "rule": null, "alpn": null,
                "decision": "allow", "terminated": true}),
        ),
        (
            Event::Tls(Exchange {
                dst: s("10.0.2.100:443"),
                sni: Some(None),
                terminated: Some(true),
                decision: deny,
                reason: s("guest TLS failed: x"),
                ..x()
            }),
            json!({"event": "tls", "dst": "10.0.2.100:443", "sni": null, "terminated": true, "decision": "deny",
                "reason": "guest TLS failed: x"}),
        ),
        // Upstream, ends, refusals
        (
            Event::Upstream(Upstream {
                dst: "10.0.2.100:443".into(),
                port: Some(443),
                name: s("a.test"),
                error: "not global".into(),
                decision: deny,
                refused: Some(vec![RefusedAddr { addr: "127.0.0.1".into(), class: "loopback".into() }]),
                ..Upstream::default()
            }),
            json!({"event": "upstream", "dst": "10.0.2.100:443", "port": 443, "name": "a.test", "error": "not global",
                "decision": "deny", "refused": [{"addr": "127.0.0.1", "class": "loopback"}]}),
        ),
        (
            Event::Upstream(Upstream {
                dst: "10.0.2.100:443".into(),
                port: Some(443),
                name: None,
                error: "tls".into(),
                decision: deny,
                tls: s("upstream certificate or handshake refused"),
                ..Upstream::default()
            }),
            json!({"event": "upstream", "dst": "10.0.2.100:443", "port": 443, "name": null, "error": "tls",
                "decision": "deny", "tls": "upstream certificate or handshake refused"}),
        ),
        (
            Event::Upstream(Upstream {
                dst: "10.0.2.100:443".into(),
                name: s("a.test"),
                error: "upstream TLS: eof".into(),
                ..Upstream::default()
            }),
            json!({"event": "upstream", "dst": "10.0.2.100:443", "name": "a.test", "error": "upstream TLS: eof"}),
        ),
        (
            Event::ConnEnd(ConnEnd {
                dst: "10.0.2.100:443".into(),
                port: 443,
                name: s("a.test"),
                upstream: None,
                bytes_up: 1,
                bytes_down: 2,
            }),
            json!({"event": "conn_end", "dst": "10.0.2.100:443", "port": 443, "name": "a.test", "upstream": null,
                "bytes_up": 1, "bytes_down": 2}),
        ),
        (
            Event::Refused(Refused { what: "IPv6 frame".into(), ..Refused::default() }),
            json!({"event": "refused", "what": "IPv6 frame"}),
        ),
        (
            Event::Refused(Refused { what: "TCP to port 22".into(), reset: Some(true), ..Refused::default() }),
            json!({"event": "refused", "what": "TCP to port 22", "reset": true}),
        ),
        (
            Event::Refused(Refused {
                what: "TCP connection".into(),
                reason: s("256 open"),
                limit: s("connections"),
                count: Some(3),
                ..Refused::default()
            }),
            json!({"event": "refused", "what": "TCP connection", "reason": "256 open", "limit": "connections", "count": 3}),
        ),
        (
            Event::Refused(Refused {
                what: "forwarded connection".into(),
                host_port: Some(8080),
                guest_port: Some(80),
                peer: s("127.0.0.1:5000"),
                count: Some(1),
                limit: s("forwards_per_port"),
                reason: s("full"),
                ..Refused::default()
            }),
            json!({"event": "refused", "what": "forwarded connection", "host_port": 8080, "guest_port": 80,
                "peer": "127.0.0.1:5000", "count": 1, "limit": "forwards_per_port", "reason": "full"}),
        ),
        (
            Event::Reclaimed(Reclaimed { dst: "10.0.2.100:80".into(), port: 80, reason: "idle".into() }),
            json!({"event": "reclaimed", "dst": "10.0.2.100:80", "port": 80, "reason": "idle"}),
        ),
        (
            Event::Timeout(Timeout {
                limit: "response_head".into(),
                limit_ms: 30000,
                dst: "10.0.2.100:80".into(),
                port: 80,
                name: None,
                reason: "no head".into(),
            }),
            json!({"event": "timeout", "limit": "response_head", "limit_ms": 30000, "dst": "10.0.2.100:80", "port": 80,
                "name": null, "reason": "no head"}),
        ),
    ]
}

//! Host side, tests only: subscription sign-ins through the whole stack —
//! a simulated guest holding only placeholders, a scripted OAuth token
//! endpoint and an API upstream (TLS, 127.0.0.1), and the host store
//! shared by two sandboxes.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use super::*;
use crate::oauth::{MemoryStore, OAuthSession, Provider, Tokens};

static PROVIDER: std::sync::LazyLock<Provider> = std::sync::LazyLock::new(|| Provider {
    agent: "claude".into(),
    api_hosts: vec![HostName::parse("api.example.com").unwrap()],
    token_hosts: vec![HostName::parse("auth.example.com").unwrap()],
    token_path: "/v1/oauth/token".into(),
    id_token: false,
    credentials_file: ".claude/.credentials.json".into(),
});
const OAUTH_NAMES: &[&str] = &["api.example.com", "auth.example.com"];
const ACCESS: &str = "sk-ant-oat01-real-access-token-0001";
const REFRESH: &str = "sk-ant-ort01-real-refresh-token-0001";
const NEW_ACCESS: &str = "sk-ant-oat01-real-access-token-0002";
const NEW_REFRESH: &str = "sk-ant-ort01-real-refresh-token-0002";

/// The token endpoint's answers, one per request, in order.
type Script = Arc<Mutex<VecDeque<String>>>;

/// A TLS token endpoint: each request (kept in `Seen`) gets the next
/// scripted body as a 200 JSON answer, or a raw response if the script
/// entry starts with `HTTP/`.
fn token_endpoint(cert: CertificateDer<'static>, key: PrivateKeyDer<'static>, script: Script) -> (SocketAddr, Seen) {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let (config, log, script) = (config.clone(), log.clone(), script.clone());
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = BufReader::new(StreamOwned::new(conn, tcp));
                if let Some((head, body)) = read_request(&mut tls) {
                    log.lock().unwrap().push((head, body));
                    let answer = script.lock().unwrap().pop_front().unwrap_or_default();
                    let out = if answer.starts_with("HTTP/") {
                        answer
                    } else {
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
                            answer.len()
                        )
                    };
                    let w = tls.get_mut();
                    let _ = w.write_all(out.as_bytes()).and_then(|_| w.flush());
                    w.conn.send_close_notify();
                    let _ = w.flush();
                }
            });
        }
    });
    (addr, seen)
}

fn tokens(access: &str, refresh: &str) -> Tokens {
    Tokens {
        access: Secret::new(access).unwrap(),
        refresh: Secret::new(refresh).unwrap(),
        expires_at_ms: 1,
        exchanged_at_ms: 0,
        id_claims: Default::default(),
    }
}

struct Sandbox {
    s: Setup,
    session: Arc<OAuthSession>,
    api: Ipv4Addr,
    auth: Ipv4Addr,
}

struct World {
    root: CertificateDer<'static>,
    api_addr: SocketAddr,
    api_seen: Seen,
    token_addr: SocketAddr,
    token_seen: Seen,
    script: Script,
    store: Arc<MemoryStore>,
}

fn world() -> World {
    let (root, cert, key) = test_pki(OAUTH_NAMES);
    let (api_addr, api_seen) = tls_upstream(cert.clone(), key.clone_key());
    let script: Script = Arc::default();
    let (token_addr, token_seen) = token_endpoint(cert, key, script.clone());
    let store = Arc::new(MemoryStore::default());
    store.tokens.lock().unwrap().insert("claude-oauth".into(), tokens(ACCESS, REFRESH));
    World { root, api_addr, api_seen, token_addr, token_seen, script, store }
}

impl World {
    /// A sandbox whose guest holds fresh placeholders for the stored
    /// tokens (`n` tells its placeholders apart).
    fn sandbox(&self, n: u8) -> Sandbox {
        let stored = self.store.tokens.lock().unwrap()["claude-oauth"].clone();
        let session = Arc::new(OAuthSession::with_placeholders(
            "claude-oauth",
            &PROVIDER,
            stored,
            self.store.clone(),
            format!("sbx-oauth-access-{n:032x}"),
            format!("sbx-oauth-refresh-{n:032x}"),
        ));
        let creds = Credentials::new(vec![Credential::oauth(
            rule("claude-oauth", &["api.example.com"], "Authorization", Some("Bearer")),
            session.clone(),
        )]);
        let routes = [("api.example.com", 443, self.api_addr), ("auth.example.com", 443, self.token_addr)];
        let mut s = Setup::with_credentials(POLICY, &routes, &self.root, creds);
        let api = s.resolve("api.example.com");
        let auth = s.resolve("auth.example.com");
        Sandbox { s, session, api, auth }
    }
}

fn whole(t: &str) -> bool {
    t.split_once("\r\n\r\n").is_some_and(|(head, body)| {
        head.lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().parse::<usize>()))
            .and_then(Result::ok)
            .is_some_and(|n| body.len() >= n)
    })
}

impl Sandbox {
    fn api(&mut self, path: &str) -> String {
        let req =
            get("api.example.com", path, &format!("Authorization: Bearer {}\r\n", self.session.access_placeholder));
        self.s.https(self.api, "api.example.com", &[b"http/1.1"], &req, &whole).text
    }

    fn refresh_with(&mut self, body: &str) -> String {
        let req = format!(
            "POST /v1/oauth/token HTTP/1.1\r\nHost: auth.example.com\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.s.https(self.auth, "auth.example.com", &[b"http/1.1"], req.as_bytes(), &whole).text
    }

    fn refresh(&mut self) -> String {
        let body = format!(
            r#"{{"grant_type":"refresh_token","refresh_token":"{}","client_id":"9d1c250a-e61b-44d9-88ed-5944d1962f5e"}}"#,
            self.session.refresh_placeholder
        );
        self.refresh_with(&body)
    }
}

fn body_json(text: &str) -> serde_json::Value {
    serde_json::from_str(text.split_once("\r\n\r\n").expect("a response").1).expect("a JSON body")
}

fn no_real_token(text: &str) {
    for t in [ACCESS, REFRESH, NEW_ACCESS, NEW_REFRESH] {
        assert!(!text.contains(t), "{t} reached the guest or the log: {text}");
    }
}

#[test]
fn the_access_placeholder_becomes_the_real_token_upstream() {
    let w = world();
    let mut b = w.sandbox(1);
    let out = b.api("/v1/messages");
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    let seen = w.api_seen.lock().unwrap().clone();
    assert!(seen[0].0.contains(&format!("Authorization: Bearer {ACCESS}\r\n")), "{}", seen[0].0);
    assert!(!seen[0].0.contains("sbx-oauth-"), "{}", seen[0].0);
    let log = b.s.audit();
    assert!(log.contains("\"credential\":\"claude-oauth\""), "{log}");
    no_real_token(&log);
}

#[test]
fn a_refresh_is_exchanged_on_the_host_and_the_guest_gets_placeholders() {
    let w = world();
    w.script.lock().unwrap().push_back(format!(
        r#"{{"token_type":"Bearer","access_token":"{NEW_ACCESS}","refresh_token":"{NEW_REFRESH}","expires_in":28800,"scope":"user:inference","id_token":"{NEW_ACCESS}x"}}"#
    ));
    let mut b = w.sandbox(1);
    let out = b.refresh();
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    no_real_token(&out);
    let v = body_json(&out);
    assert_eq!(v["access_token"], b.session.access_placeholder.as_str());
    assert_eq!(v["refresh_token"], b.session.refresh_placeholder.as_str());
    assert_eq!(v["scope"], "user:inference", "other fields pass");
    assert!(v.get("id_token").is_none(), "fields naming a token are dropped");
    assert!((28790..=28800).contains(&v["expires_in"].as_u64().unwrap()), "{v}");
    // The endpoint got the real refresh token, the guest's other fields.
    let seen = w.token_seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    let sent: serde_json::Value = serde_json::from_slice(&seen[0].1).unwrap();
    assert_eq!(sent["refresh_token"], REFRESH);
    assert_eq!(sent["grant_type"], "refresh_token");
    assert_eq!(sent["client_id"], "9d1c250a-e61b-44d9-88ed-5944d1962f5e");
    // Written back to the host store, once.
    let stored = w.store.tokens.lock().unwrap()["claude-oauth"].clone();
    assert_eq!((stored.access.expose(), stored.refresh.expose()), (NEW_ACCESS, NEW_REFRESH));
    assert_eq!(w.store.writes.load(Ordering::SeqCst), 1);
    // The next API request carries the new access token.
    b.api("/v1/messages");
    let api = w.api_seen.lock().unwrap().clone();
    assert!(api[0].0.contains(&format!("Bearer {NEW_ACCESS}\r\n")), "{}", api[0].0);
    let log = b.s.audit();
    let line = log.lines().find(|l| l.contains("\"event\":\"oauth\"")).expect("the refresh is audited");
    let e: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!((e["credential"].as_str(), e["outcome"].as_str()), (Some("claude-oauth"), Some("exchanged")));
    assert!(e["expires_at_ms"].as_u64().unwrap() > 0);
    no_real_token(&log);
    assert!(audit::verify(log.as_bytes()).is_ok());
}

#[test]
fn a_second_sandbox_refreshing_after_a_rotation_is_answered_from_the_store() {
    let w = world();
    w.script
        .lock()
        .unwrap()
        .push_back(format!(r#"{{"access_token":"{NEW_ACCESS}","refresh_token":"{NEW_REFRESH}","expires_in":3600}}"#));
    let mut a = w.sandbox(1);
    let mut b = w.sandbox(2);
    assert!(a.refresh().starts_with("HTTP/1.1 200 OK"));
    let out = b.refresh();
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    no_real_token(&out);
    let v = body_json(&out);
    assert_eq!(v["access_token"], b.session.access_placeholder.as_str(), "b's own placeholders");
    assert_eq!(v["refresh_token"], b.session.refresh_placeholder.as_str());
    assert_eq!(w.token_seen.lock().unwrap().len(), 1, "no second exchange: the old refresh token is spent");
    assert_eq!(w.store.writes.load(Ordering::SeqCst), 1);
    assert!(b.s.audit().contains("\"outcome\":\"from_store\""), "{}", b.s.audit());
    b.api("/v1/messages");
    let api = w.api_seen.lock().unwrap().clone();
    assert!(api[0].0.contains(&format!("Bearer {NEW_ACCESS}\r\n")), "b injects the rotated token: {}", api[0].0);
}

#[test]
fn a_malformed_answer_or_request_gets_the_guest_an_error_and_no_token() {
    let w = world();
    let answers = [
        "not json".to_string(),
        format!(r#"{{"refresh_token":"{NEW_REFRESH}"}}"#),
        format!(r#"{{"access_token":"{NEW_ACCESS}","expires_in":"soon"}}"#),
        format!("HTTP/1.1 401 Unauthorized\r\nContent-Length: {}\r\n\r\n{NEW_ACCESS}", NEW_ACCESS.len()),
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{{\"access_token\":\"{NEW_ACCESS}\"}}{}",
            2 * 1024 * 1024,
            "x".repeat(80 * 1024)
        ),
    ];
    w.script.lock().unwrap().extend(answers.iter().cloned());
    let mut b = w.sandbox(1);
    for answer in &answers {
        // Each attempt after the rate limit's interval (a failed attempt
        // counts too: see `a_failed_exchange_holds_the_next_off`).
        w.store.tokens.lock().unwrap().get_mut("claude-oauth").unwrap().exchanged_at_ms = 0;
        let out = b.refresh();
        assert!(out.starts_with("HTTP/1.1 502"), "{answer:.40}: {out}");
        assert_eq!(body_json(&out)["error"], "sbx_oauth");
        no_real_token(&out);
    }
    assert_eq!(w.token_seen.lock().unwrap().len(), answers.len());
    // The guest's own mistakes never reach the endpoint.
    for bad in [
        "nope".to_string(),
        r#"{"grant_type":"authorization_code","code":"x"}"#.to_string(),
        format!(r#"{{"grant_type":"refresh_token","refresh_token":"{REFRESH}"}}"#),
    ] {
        let out = b.refresh_with(&bad);
        assert!(out.starts_with("HTTP/1.1 400"), "{bad}: {out}");
        no_real_token(&out);
    }
    assert_eq!(w.token_seen.lock().unwrap().len(), answers.len());
    // Nothing stored but the attempts' times.
    let stored = w.store.tokens.lock().unwrap()["claude-oauth"].clone();
    assert_eq!((stored.access.expose(), stored.refresh.expose()), (ACCESS, REFRESH));
    assert!(stored.exchanged_at_ms > 0);
    let log = b.s.audit();
    assert!(log.contains("\"outcome\":\"refused\""), "{log}");
    no_real_token(&log);
}

#[test]
fn the_refresh_placeholder_elsewhere_is_a_leak_and_rotated_tokens_echoed_are_masked() {
    let w = world();
    w.script
        .lock()
        .unwrap()
        .push_back(format!(r#"{{"access_token":"{NEW_ACCESS}","refresh_token":"{NEW_REFRESH}","expires_in":3600}}"#));
    let mut b = w.sandbox(1);
    let req = get("api.example.com", "/echo", &format!("X-Refresh: {}\r\n", b.session.refresh_placeholder));
    let out = b.s.https(b.api, "api.example.com", &[b"http/1.1"], &req, &whole).text;
    assert!(out.starts_with("HTTP/1.1 403"), "the refresh placeholder only goes to the token endpoint: {out}");
    assert!(b.refresh().starts_with("HTTP/1.1 200 OK"));
    let out = b.api("/echo");
    assert!(out.contains(&format!("Authorization: Bearer {}", "*".repeat(NEW_ACCESS.len()))), "{out}");
    no_real_token(&out);
}

#[test]
fn a_guest_repeating_its_refresh_gets_one_exchange() {
    let w = world();
    w.script
        .lock()
        .unwrap()
        .push_back(format!(r#"{{"access_token":"{NEW_ACCESS}","refresh_token":"{NEW_REFRESH}","expires_in":3600}}"#));
    let mut b = w.sandbox(1);
    assert!(b.refresh().starts_with("HTTP/1.1 200 OK"));
    for _ in 0..3 {
        let out = b.refresh();
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        no_real_token(&out);
        assert_eq!(body_json(&out)["access_token"], b.session.access_placeholder.as_str());
    }
    assert_eq!(w.token_seen.lock().unwrap().len(), 1, "one exchange within the interval");
    let stored = w.store.tokens.lock().unwrap()["claude-oauth"].clone();
    assert_eq!(stored.refresh.expose(), NEW_REFRESH, "the rotated token is kept, not churned");
    assert_eq!(b.s.audit().matches("\"outcome\":\"from_store\"").count(), 3, "{}", b.s.audit());
}

#[test]
fn a_failed_exchange_holds_the_next_off() {
    let w = world();
    w.script.lock().unwrap().push_back("HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\n{}".into());
    let mut b = w.sandbox(1);
    let mut c = w.sandbox(2);
    assert!(b.refresh().starts_with("HTTP/1.1 502"));
    // Neither b again nor another sandbox on the host reach the endpoint.
    assert!(b.refresh().starts_with("HTTP/1.1 200 OK"));
    assert!(c.refresh().starts_with("HTTP/1.1 200 OK"));
    assert_eq!(w.token_seen.lock().unwrap().len(), 1);
}

//! Host side: end-to-end tests of the agents — the real Claude Code, Codex,
//! Gemini CLI, Copilot CLI, OpenCode and Aider in their image, each booted
//! by `sbx run AGENT`. One boot per check (each agent's CLI starts slowly
//! on emulated-KVM hosts): `--version` for each (the pinned version), and,
//! where CI's time allows, one real turn against the scripted model server
//! on the host's loopback (`sbx_tests::model`), reached through an API name
//! of the agent's policy mapped with `--resolve`: the agent writes a file
//! into the workspace by a tool call, then prints the model's final text.
//!
//! CI time: every boot here is minutes on an emulated-KVM CI host, and the
//! three agents added last were given about 15 minutes of CI in all (the
//! image's growth included). Copilot CLI has `--version` and a turn in a
//! guest (72 s and 411 s here). Aider has only `--version` (264 s): its
//! Python start alone (litellm, numpy, scipy imported) spent over 5 minutes
//! of vCPU before its first request in a guest, against 3 s on the host,
//! so its turn did not fit. OpenCode has only `--version` in a guest
//! (290 s on 2026-12-07, with three debug builds beside it; 868 s when
//! first measured, under heavier load): its runtime (Bun) spends most of that
//! in the guest kernel, on ~40,000 page faults at milliseconds each here
//! (its scripted turn took 1238 s), against under a second on the host.
//! OpenCode's turn,
//! and every other agent's, runs against the same scripted model with the
//! real CLI on the host in `agents_host.rs` (a developer tool, seconds
//! each), which proves the scripted model speaks its API; what a guest
//! turn adds (the policy, the audit log, the file through the shared
//! workspace) is the same code for every agent and is covered by the other
//! agents' turns here.

use std::fs;
use std::process::Output;
use std::time::{Duration, Instant};

use sbx_tests::model::{Answer, ModelServer, Script};
use sbx_tests::upstream::Upstream;
use sbx_tests::{text, Sbx};

/// How long one agent's boot and run may take here (minutes on emulated
/// KVM; seconds on hardware).
const AGENT_TIMEOUT_S: u64 = 2400;

fn run(sbx: &Sbx, args: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let out = sbx.run(args, b"");
    let took = started.elapsed();
    eprintln!(
        "sbx {} -> {:?} in {:.0} s\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.status.code(),
        took.as_secs_f64(),
        text(&out.stdout),
        text(&out.stderr)
    );
    (out, took)
}

/// `sbx run AGENT -- --version` prints the pinned version and exits 0.
fn version(agent: &str, want: &str) {
    let sbx = Sbx::new();
    let name = format!("{agent}-version");
    let timeout = AGENT_TIMEOUT_S.to_string();
    let (out, _) =
        run(&sbx, &["run", agent, "--name", &name, "--no-network", "--timeout", &timeout, "--", "--version"]);
    assert_eq!(out.status.code(), Some(0), "{agent} --version");
    assert!(text(&out.stdout).contains(want), "{agent} --version: {}", text(&out.stdout));
}

#[test]
#[ignore = "boots the agents' guest: needs /dev/kvm, `cargo xtask kernel`, `cargo xtask image claude` and a release sbx; run by `cargo xtask test`"]
fn claude_prints_its_version() {
    version("claude", "2.1.332 (Claude Code)");
}

#[test]
#[ignore = "boots the agents' guest: needs /dev/kvm, `cargo xtask kernel`, `cargo xtask image claude` and a release sbx; run by `cargo xtask test`"]
fn gemini_prints_its_version() {
    version("gemini", "0.61.0");
}

#[test]
#[ignore = "boots the agents' guest: needs /dev/kvm, `cargo xtask kernel`, `cargo xtask image claude` and a release sbx; run by `cargo xtask test`"]
fn codex_prints_its_version() {
    version("codex", "codex-cli 0.171.0");
}

#[test]
#[ignore = "boots the agents' guest: needs /dev/kvm, `cargo xtask kernel`, `cargo xtask image claude` and a release sbx; run by `cargo xtask test`"]
fn copilot_prints_its_version() {
    version("copilot", "GitHub Copilot CLI 1.0.102");
}

/// Minutes here (see the module docs): most of it page faults in Bun.
#[test]
#[ignore = "boots the agents' guest: needs /dev/kvm, `cargo xtask kernel`, `cargo xtask image claude` and a release sbx; run by `cargo xtask test`"]
fn opencode_prints_its_version() {
    version("opencode", "1.18.33");
}

#[test]
#[ignore = "boots the agents' guest: needs /dev/kvm, `cargo xtask kernel`, `cargo xtask image claude` and a release sbx; run by `cargo xtask test`"]
fn aider_prints_its_version() {
    version("aider", "0.86.2");
}

/// One agent turn in a sandbox: the model (scripted, on the host) asks for
/// a file to be written, then ends with `final_text`. `host`: the agent's
/// API name, mapped to the server; `env` and `args`: how the agent is
/// pointed at it.
fn turn(agent: &str, host: &str, env: &[String], args: &[&str]) {
    turn_with_setup(agent, host, env, args, |_| {});
}

/// Like [`turn`], with `setup` run on the workspace first.
fn turn_with_setup(agent: &str, host: &str, env: &[String], args: &[&str], setup: impl FnOnce(&std::path::Path)) {
    let sbx = Sbx::new();
    let ws = sbx.work.path().canonicalize().unwrap();
    setup(&ws);
    let script = Script {
        workspace: ws.display().to_string(),
        file: "sbx-proof.txt".into(),
        content: format!("written by {agent} in a sandbox\n"),
        final_text: format!("sbx-done-{agent}"),
        command: None,
        token: None,
    };
    let server = ModelServer::start(script.clone(), Duration::from_secs(AGENT_TIMEOUT_S + 60)).unwrap();
    let map = format!("{host}:80:127.0.0.1:{}", server.port());
    let name = format!("{agent}-turn");
    let timeout = AGENT_TIMEOUT_S.to_string();
    let mut argv: Vec<String> = ["run", agent, "--name", &name, "--timeout", &timeout, "--resolve", &map]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for e in env {
        argv.extend(["--env".to_string(), e.clone()]);
    }
    argv.push("--".into());
    argv.extend(args.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let (out, took) = run(&sbx, &argv);
    for r in server.requests() {
        eprintln!("model server: {}", r.summary());
    }
    assert_eq!(out.status.code(), Some(0), "{agent}'s exit status is sbx's");
    assert!(text(&out.stdout).contains(&script.final_text), "the agent's final text reached sbx's stdout");
    assert_eq!(fs::read_to_string(ws.join(&script.file)).unwrap(), script.content, "the file is on the host");
    assert!(!server.answered(Answer::ToolCall).is_empty() && !server.answered(Answer::FinalText).is_empty());
    // The audit log has the API requests and the file's creation.
    let log = sbx.cmd().args(["log", &name, "--audit"]).output().unwrap();
    assert!(log.status.success(), "{}", text(&log.stderr));
    let lines: Vec<serde_json::Value> =
        text(&log.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let api = lines.iter().filter(|v| v["event"] == "http" && v["host"] == host && v["decision"] == "allow").count();
    assert!(api >= 2, "the audit log holds the agent's API requests ({api})");
    let proof = format!("{}/{}", ws.display(), script.file);
    // Made in place, or written aside and renamed onto its name.
    assert!(
        lines.iter().any(|v| v["event"] == "file"
            && ((v["op"] == "create" && v["path"] == proof.as_str())
                || (v["op"] == "rename" && v["to"] == proof.as_str()))),
        "the audit log holds the file's creation"
    );
    eprintln!("{agent}: one scripted turn in {:.0} s", took.as_secs_f64());
}

#[test]
#[ignore = "boots the agents' guest: needs /dev/kvm, `cargo xtask kernel`, `cargo xtask image claude` and a release sbx; run by `cargo xtask test`"]
fn codex_writes_a_file_in_one_turn() {
    let base = "model_providers.sbx.base_url=http://api.openai.com/v1";
    turn(
        "codex",
        "api.openai.com",
        &["OPENAI_API_KEY=sk-sbx-dummy".into()],
        &[
            "exec",
            "--skip-git-repo-check",
            "--dangerously-bypass-approvals-and-sandbox",
            "-m",
            "gpt-5.5",
            "-c",
            "model_provider=sbx",
            "-c",
            "model_providers.sbx.name=sbx",
            "-c",
            base,
            "-c",
            "model_providers.sbx.wire_api=responses",
            "-c",
            "model_providers.sbx.env_key=OPENAI_API_KEY",
            "-c",
            "analytics.enabled=false",
            "--disable",
            "plugins",
            "Write the file sbx-proof.txt, then say you are done.",
        ],
    );
}

#[test]
#[ignore = "boots the agents' guest: needs /dev/kvm, `cargo xtask kernel`, `cargo xtask image claude` and a release sbx; run by `cargo xtask test`"]
fn claude_writes_a_file_in_one_turn() {
    turn(
        "claude",
        "api.anthropic.com",
        &[
            "ANTHROPIC_BASE_URL=http://api.anthropic.com".into(),
            "ANTHROPIC_API_KEY=sk-ant-sbx-dummy".into(),
            "DISABLE_TELEMETRY=1".into(),
            "DISABLE_ERROR_REPORTING=1".into(),
        ],
        &[
            "-p",
            "Write the file sbx-proof.txt, then say you are done.",
            "--permission-mode",
            "acceptEdits",
            "--allowedTools",
            "Write",
        ],
    );
}

#[test]
#[ignore = "boots the agents' guest: needs /dev/kvm, `cargo xtask kernel`, `cargo xtask image claude` and a release sbx; run by `cargo xtask test`"]
fn gemini_writes_a_file_in_one_turn() {
    // Gemini CLI needs to be told to use an API key when its base URL is
    // set (else it picks a gateway sign-in and stops): the workspace's own
    // settings file says so.
    turn_with_setup(
        "gemini",
        "generativelanguage.googleapis.com",
        &[
            "GEMINI_API_KEY=sbx-dummy-gemini-key".into(),
            "GOOGLE_GEMINI_BASE_URL=http://generativelanguage.googleapis.com".into(),
            "GEMINI_CLI_TRUST_WORKSPACE=true".into(),
        ],
        &["-p", "Write the file sbx-proof.txt, then say you are done.", "--yolo", "--skip-trust"],
        |ws| {
            fs::create_dir_all(ws.join(".gemini")).unwrap();
            let settings = r#"{"security":{"auth":{"selectedType":"gemini-api-key"}},"privacy":{"usageStatisticsEnabled":false},"telemetry":{"enabled":false},"general":{"enableAutoUpdate":false,"enableAutoUpdateNotification":false}}"#;
            fs::write(ws.join(".gemini/settings.json"), settings).unwrap();
        },
    );
}

/// A real agent's tool call reaches for a host no rule allows: the
/// request is held (the turn waits), a person approves it from a second
/// process, and the turn completes with the fetched file written. Claude
/// Code's Bash tool runs `curl` to `held.agent.test` (mapped to a
/// recording upstream on the host's loopback); `--approval ask` holds it.
#[test]
#[ignore = "boots the agents' guest: needs /dev/kvm, `cargo xtask kernel`, `cargo xtask image claude` and a release sbx; run by `cargo xtask test`"]
fn claude_waits_for_a_person_then_its_curl_goes_through() {
    use std::io::Read;
    use std::process::Stdio;
    let sbx = Sbx::new();
    let ws = sbx.work.path().canonicalize().unwrap();
    let up = Upstream::start(Duration::from_secs(AGENT_TIMEOUT_S + 60));
    let proof = ws.join("sbx-fetched.txt");
    let script = Script {
        workspace: ws.display().to_string(),
        file: "sbx-fetched.txt".into(),
        content: "echo GET /data".into(),
        final_text: "sbx-done-approved".into(),
        command: Some(format!("curl -sS --max-time 900 http://held.agent.test/data -o {}", proof.display())),
        token: None,
    };
    let server = ModelServer::start(script.clone(), Duration::from_secs(AGENT_TIMEOUT_S + 60)).unwrap();
    let timeout = AGENT_TIMEOUT_S.to_string();
    let model = format!("api.anthropic.com:80:127.0.0.1:{}", server.port());
    let held = format!("held.agent.test:80:127.0.0.1:{}", up.port);
    let name = "claude-approve";
    let mut child = sbx
        .cmd()
        .args(["run", "claude", "--name", name, "--timeout", &timeout, "--resolve", &model, "--resolve", &held])
        .args(["--approval", "ask", "--approval-wait", "540"])
        .args(["--env", "ANTHROPIC_BASE_URL=http://api.anthropic.com", "--env", "ANTHROPIC_API_KEY=sk-ant-sbx-dummy"])
        .args(["--env", "DISABLE_TELEMETRY=1", "--env", "DISABLE_ERROR_REPORTING=1"])
        .args(["--", "-p", "Fetch http://held.agent.test/data into sbx-fetched.txt, then say you are done."])
        .args(["--permission-mode", "acceptEdits", "--allowedTools", "Bash"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let mut stderr = child.stderr.take().unwrap();
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    // Wait for the question, from this (second) process.
    let deadline = Instant::now() + Duration::from_secs(AGENT_TIMEOUT_S);
    let (id, what, method) = loop {
        if let Some(q) = sbx.waiting(name).into_iter().next() {
            break q;
        }
        assert!(Instant::now() < deadline, "no request was ever held");
        if let Some(status) = child.try_wait().unwrap() {
            let (o, e) = (out.join().unwrap(), err.join().unwrap());
            panic!("the run ended ({status}) before anything was held:\nstdout:\n{o}\nstderr:\n{e}");
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!((what.as_str(), method.as_str()), ("held.agent.test:80/data", "GET"));
    assert!(up.seen().is_empty(), "nothing reached the upstream while held");
    assert!(!proof.exists(), "the turn waits: the file is not there yet");
    let asked = Instant::now();
    let approve = sbx.cmd().args(["approve", name, &id, "--once"]).output().unwrap();
    assert!(approve.status.success(), "sbx approve: {}", text(&approve.stderr));
    let status = child.wait().unwrap();
    let (stdout, stderr) = (out.join().unwrap(), err.join().unwrap());
    eprintln!("stdout:\n{stdout}\nstderr:\n{stderr}");
    for r in server.requests() {
        eprintln!("model server: {}", r.summary());
    }
    assert_eq!(status.code(), Some(0), "claude's exit status is sbx's");
    assert!(stdout.contains(&script.final_text), "the turn completed");
    assert_eq!(fs::read_to_string(&proof).unwrap(), "echo GET /data", "the fetched file is in the workspace");
    let seen = up.seen();
    assert_eq!(seen.len(), 1, "the approved request reached the upstream once: {:?}", up.requests());
    eprintln!(
        "figure: `sbx approve` to the held request at the upstream: {:.0} ms",
        seen[0].at.duration_since(asked).as_secs_f64() * 1000.0
    );
    assert!(!server.answered(Answer::FinalText).is_empty(), "the tool's result went back to the model");
    let log = sbx.cmd().args(["log", name, "--audit", "--json"]).output().unwrap();
    let lines: Vec<serde_json::Value> =
        text(&log.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let has = |f: &dyn Fn(&serde_json::Value) -> bool| lines.iter().any(f);
    assert!(has(&|v| v["event"] == "approval" && v["decision"] == "held" && v["host"] == "held.agent.test"));
    assert!(has(&|v| v["event"] == "approval" && v["answer"] == "approved"));
    assert!(has(&|v| v["event"] == "http" && v["host"] == "held.agent.test" && v["decision"] == "allow"));
    let verify = sbx.cmd().args(["audit", "verify", name]).output().unwrap();
    assert_eq!(verify.status.code(), Some(0), "{}", text(&verify.stdout));
}

/// Claude Code signed in with a subscription (OAuth) whose tokens stay on
/// the host: `sbx secret oauth-import claude` stores them; the guest's
/// `~/.claude/.credentials.json` holds placeholders and an expiry already
/// past, so the real Claude Code refreshes first. Its refresh reaches the
/// scripted token endpoint (TLS, `platform.claude.com`, through netstack,
/// which put the real refresh token in) and the answer comes back to it
/// with placeholders; its API requests then carry the NEW real access
/// token, injected by netstack; the store on the host holds the rotated
/// tokens; no real token is on the guest's disk, in its console or in the
/// audit log.
#[test]
#[ignore = "boots the agents' guest: needs /dev/kvm, `cargo xtask kernel`, `cargo xtask image claude` and a release sbx; run by `cargo xtask test`"]
fn claude_signs_in_with_tokens_that_stay_on_the_host() {
    use std::os::unix::fs::PermissionsExt;
    let sbx = Sbx::new();
    let config = tempfile::tempdir().unwrap();
    let ws = sbx.work.path().canonicalize().unwrap();
    let tag = format!("{:x}{:x}", std::process::id(), Instant::now().elapsed().as_nanos() ^ 0x0a07);
    let (old_access, old_refresh) = (format!("sk-ant-oat01-e2e-old-{tag}"), format!("sk-ant-ort01-e2e-old-{tag}"));
    let (new_access, new_refresh) = (format!("sk-ant-oat01-e2e-new-{tag}"), format!("sk-ant-ort01-e2e-new-{tag}"));
    // The user's own sign-in file, as Claude Code writes it on the host.
    let from = config.path().join("host-credentials.json");
    let file = serde_json::json!({"claudeAiOauth": {"accessToken": old_access, "refreshToken": old_refresh,
        "expiresAt": 1_000u64, "scopes": ["user:inference", "user:profile"], "subscriptionType": "max"}});
    fs::write(&from, file.to_string()).unwrap();
    fs::set_permissions(&from, fs::Permissions::from_mode(0o600)).unwrap();
    let store = config.path().join("cfg");
    let import = sbx
        .cmd()
        .env("SBX_CONFIG", &store)
        .args(["secret", "oauth-import", "claude", "--from"])
        .arg(&from)
        .output()
        .unwrap();
    assert!(import.status.success(), "{}", text(&import.stderr));

    let ca = sbx_tests::tls::TestCa::new(&["api.anthropic.com", "platform.claude.com", "console.anthropic.com"]);
    let root = config.path().join("upstream-root.pem");
    fs::write(&root, &ca.root_pem).unwrap();
    let script = Script {
        workspace: ws.display().to_string(),
        file: "sbx-proof.txt".into(),
        content: "written by claude signed in\n".into(),
        final_text: "sbx-done-oauth".into(),
        command: None,
        token: Some(serde_json::json!({"access_token": new_access, "refresh_token": new_refresh,
            "expires_in": 28800, "token_type": "Bearer", "scope": "user:inference user:profile"})),
    };
    let server =
        ModelServer::start_tls(script.clone(), Duration::from_secs(AGENT_TIMEOUT_S + 60), ca.server.clone()).unwrap();
    let map = |host: &str| format!("{host}:443:127.0.0.1:{}", server.port());
    let timeout = AGENT_TIMEOUT_S.to_string();
    let name = "claude-oauth";
    let started = Instant::now();
    let out = sbx
        .cmd()
        .env("SBX_CONFIG", &store)
        .args(["run", "claude", "--name", name, "--timeout", &timeout, "--disk-size", "2", "--upstream-ca"])
        .arg(&root)
        .args(["--resolve", &map("api.anthropic.com"), "--resolve", &map("platform.claude.com")])
        .args(["--resolve", &map("console.anthropic.com")])
        .args(["--env", "DISABLE_TELEMETRY=1", "--env", "DISABLE_ERROR_REPORTING=1"])
        .args(["--", "-p", "Write the file sbx-proof.txt, then say you are done."])
        .args(["--permission-mode", "acceptEdits", "--allowedTools", "Write"])
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    eprintln!("took {:.0} s\nstdout:\n{stdout}\nstderr:\n{stderr}", started.elapsed().as_secs_f64());
    for r in server.requests() {
        eprintln!("model server: {} auth={:?}", r.summary(), r.header("authorization").map(|a| a.len()));
    }
    assert_eq!(out.status.code(), Some(0), "claude's exit status is sbx's");
    assert!(stderr.contains("signs in with secret 'claude-oauth'"), "{stderr}");
    assert!(stdout.contains(&script.final_text), "the signed-in turn completed");
    assert_eq!(fs::read_to_string(ws.join(&script.file)).unwrap(), script.content, "the file is on the host");

    // The refresh: the endpoint got the REAL refresh token (netstack's
    // exchange), never a placeholder; once.
    let refreshes = server.answered(Answer::Token);
    assert_eq!(refreshes.len(), 1, "one exchange with the token endpoint");
    let body = refreshes[0].json().expect("a JSON refresh request");
    assert_eq!(body["grant_type"], "refresh_token");
    assert_eq!(body["refresh_token"], old_refresh.as_str(), "netstack exchanged the real refresh token");
    // The API requests carried the new real access token, injected.
    let bearer = format!("Bearer {new_access}");
    let turns: Vec<_> = server.requests().into_iter().filter(|r| r.path().ends_with("/v1/messages")).collect();
    assert!(!turns.is_empty() && turns.iter().all(|r| r.header("authorization") == Some(bearer.as_str())));
    assert!(!server.answered(Answer::FinalText).is_empty(), "the tool's result went back to the model");
    // The rotated tokens are in the host's store.
    let stored = fs::read_to_string(store.join("oauth/claude-oauth")).unwrap();
    assert!(stored.contains(&new_refresh) && stored.contains(&new_access), "the store has the rotated tokens");

    // No real token in the guest's disk, its console, sbx's output or the audit log.
    let dir = sbx.home.path().join("sandboxes").join(name);
    let reals = [old_access.as_str(), old_refresh.as_str(), new_access.as_str(), new_refresh.as_str()];
    for real in reals {
        assert!(!stdout.contains(real) && !stderr.contains(real));
    }
    for f in ["console.log", "audit.log", "disk.img"] {
        let needles = [&reals[..], &["sbx-oauth-refresh-"]].concat();
        let held = sbx_tests::file_holds(&dir.join(f), &needles);
        assert!(!held[..4].iter().any(|h| *h), "a real token is in {f}: {held:?}");
        if f == "disk.img" {
            assert!(held[4], "the guest's credential file (placeholders) is on its disk");
        }
    }
    let log = sbx.cmd().args(["log", name, "--audit", "--json"]).output().unwrap();
    let lines: Vec<serde_json::Value> =
        text(&log.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(
        lines.iter().any(|v| v["event"] == "oauth" && v["outcome"] == "exchanged"),
        "the refresh is in the audit log"
    );
    let verify = sbx.cmd().args(["audit", "verify", name]).output().unwrap();
    assert_eq!(verify.status.code(), Some(0), "{}", text(&verify.stdout));
}

/// Copilot CLI with a model provider of one's own (BYOK: no GitHub
/// sign-in), in the Anthropic format, at a Copilot API name its policy
/// allows.
#[test]
#[ignore = "boots the agents' guest: needs /dev/kvm, `cargo xtask kernel`, `cargo xtask image claude` and a release sbx; run by `cargo xtask test`"]
fn copilot_writes_a_file_in_one_turn() {
    turn(
        "copilot",
        "api.githubcopilot.com",
        &[
            "COPILOT_PROVIDER_BASE_URL=http://api.githubcopilot.com".into(),
            "COPILOT_PROVIDER_TYPE=anthropic".into(),
            "COPILOT_PROVIDER_API_KEY=sk-ant-sbx-dummy".into(),
            "COPILOT_MODEL=claude-sonnet-4.5".into(),
            "COPILOT_OFFLINE=true".into(),
        ],
        &["-p", "Write the file sbx-proof.txt, then say you are done.", "--allow-all-tools"],
    );
}

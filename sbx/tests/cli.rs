//! Host side: `sbx` commands that need no guest, run as a user would.

use std::path::{Path, PathBuf};
use std::process::Command;

fn sbx(args: &[&str]) -> (Option<i32>, String, String) {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sbx")).args(args).env("SBX_HOME", home.path()).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn policy_explain_shows_matching_rules_and_the_decision() {
    let (code, out, _) = sbx(&["policy", "explain", "https://api.anthropic.com/v1/messages"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("matches preset balanced: allow api.anthropic.com"), "{out}");
    assert!(out.contains("allowed by preset balanced"), "{out}");

    let (code, out, _) = sbx(&["policy", "explain", "--preset", "locked", "https://api.anthropic.com/"]);
    assert_eq!(code, Some(1));
    assert!(out.contains("default deny"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, "version = 1\n[[rule]]\nallow = \"*.example.com\"\n[[rule]]\ndeny = \"bad.example.com\"\n")
        .unwrap();
    let f = file.to_str().unwrap();
    let (code, out, _) = sbx(&["policy", "explain", "--policy", f, "http://bad.example.com/x"]);
    assert_eq!(code, Some(1));
    assert!(out.contains("matches rule 1: allow *.example.com") && out.contains("denied by rule 2"), "{out}");
    let (code, out, _) = sbx(&["policy", "explain", "--policy", f, "https://ok.example.com/"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("TLS terminated by netstack"), "terminated by default: {out}");
    // Passthrough only where asked for, and said to be weaker.
    std::fs::write(&file, "version = 1\n[[rule]]\nallow = \"pinned.example.com\"\npassthrough = true\n").unwrap();
    let (code, out, _) = sbx(&["policy", "explain", "--policy", f, "https://pinned.example.com/"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("TLS spliced by SNI (passthrough)") && out.contains("domain fronting"), "{out}");
}

#[test]
fn policy_explain_refuses_ip_literals_and_bad_files() {
    let (code, _, err) = sbx(&["policy", "explain", "http://2130706433/"]);
    assert_eq!(code, Some(125));
    assert!(err.contains("is an IP address"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(&file, "version = 1\n[[rule]]\nallow = \"a.com\"\ndeny = \"b.com\"\n").unwrap();
    let (code, _, err) = sbx(&["policy", "explain", "--policy", file.to_str().unwrap(), "http://a.com/"]);
    assert_eq!(code, Some(125));
    assert!(err.contains("Rule 1: give exactly one of 'allow', 'deny' or 'ask'"), "{err}");
}

#[test]
fn commands_on_missing_sandboxes_fail_clearly() {
    let (code, _, err) = sbx(&["log", "nope"]);
    assert_eq!(code, Some(125));
    assert!(err.contains("No sandbox named 'nope'"), "{err}");
    let (code, out, _) = sbx(&["ls"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("NAME"), "{out}");
}

#[test]
fn policy_explain_file_shows_the_shared_folder_rules() {
    for (path, want) in
        [(".env", "hidden"), ("app/.ssh/", "hidden"), (".git/config", "read-only"), ("src/main.rs", "read-write")]
    {
        let (code, out, err) = sbx(&["policy", "explain-file", path]);
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(out, format!("{path}: {want}\n"));
    }
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "version = 1\n[files]\nread_only = [\"Makefile\"]\nhidden = [\"secrets/\"]\n").unwrap();
    let (_, out, _) = sbx(&["policy", "explain-file", "Makefile", "--policy", good.to_str().unwrap()]);
    assert_eq!(out, "Makefile: read-only\n");
    let (_, out, _) = sbx(&["policy", "explain-file", "secrets/db.txt", "--policy", good.to_str().unwrap()]);
    assert_eq!(out, "secrets/db.txt: hidden\n");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "version = 1\n[files]\nhidden = [\"/etc\"]\n").unwrap();
    let (code, _, err) = sbx(&["policy", "explain-file", "x", "--policy", bad.to_str().unwrap()]);
    assert_eq!(code, Some(125));
    assert!(err.contains("[files]") && err.contains("relative to the shared folder"), "{err}");
}

#[test]
fn run_refuses_bad_folders_before_anything_starts() {
    let (code, _, err) = sbx(&["run", "shell", "--workspace", "/", "--", "true"]);
    assert_eq!(code, Some(125));
    assert!(err.contains("Refusing to share / with the agent"), "{err}");
    let (code, _, err) = sbx(&["run", "shell", "--workspace", "/no/such/dir", "--", "true"]);
    assert_eq!(code, Some(125));
    assert!(err.contains("Workspace /no/such/dir"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().to_str().unwrap();
    let (code, _, err) = sbx(&["run", "shell", "--workspace", ws, "--mount", "/no/such/extra:ro", "--", "true"]);
    assert_eq!(code, Some(125));
    assert!(err.contains("--mount /no/such/extra:ro"), "{err}");
    let file = dir.path().join("f");
    std::fs::write(&file, "").unwrap();
    let (code, _, err) = sbx(&["run", "shell", "--workspace", file.to_str().unwrap(), "--", "true"]);
    assert_eq!(code, Some(125));
    assert!(err.contains("is not a directory"), "{err}");
}

/// `sbx ARGS` in `cwd` with `env` (SBX_HOME, SBX_ASSETS, ...).
fn sbx_in(args: &[&str], env: &[(&str, &Path)], cwd: &Path) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sbx"));
    cmd.args(args).current_dir(cwd).stdin(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// Files where the kernel and the shell image are looked for, so that
/// `sbx run` gets as far as its checks of the shared folders (these tests
/// never boot: every run here is refused before anything starts).
fn fake_assets(dir: &Path) {
    for f in ["kernel/vmlinux", "images/shell/init.cpio", "images/shell/rootfs.ext4"] {
        let path = dir.join(f);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"not really").unwrap();
    }
}

/// A sandbox folder as `sbx run` leaves it, with these settings.
fn make_sandbox(home: &Path, name: &str, settings: &str) -> PathBuf {
    let dir = home.join("sandboxes").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("sandbox.json"), settings).unwrap();
    dir
}

fn settings_json(name: &str, workspace: &str) -> String {
    serde_json::json!({ "name": name, "agent": "shell", "workspace": workspace, "created_unix": 1 }).to_string()
}

#[test]
fn logs_print_guest_text_escaped() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    let dir = make_sandbox(&home, "t", &settings_json("t", "/w"));
    // What a hostile guest can write to its kernel console: a clipboard
    // write (OSC 52), a window title, a screen clear by C1 CSI (as a
    // character and as a raw byte), a bidi override, bytes that are not
    // UTF-8 and a CR that would overwrite its line.
    let console: &[u8] = b"[    0.1] boot\r\n\x1b]52;c;cm0gLXJmIH4=\x07\x1b]0;title\x1b\\\r\n\xc2\x9b2J \x9b2J \xe2\x80\xaeevil\xff\nreal\rfake\n";
    std::fs::write(dir.join("console.log"), console).unwrap();
    let env = [("SBX_HOME", home.as_path())];
    let (code, out, err) = sbx_in(&["log", "t"], &env, t.path());
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out,
        "[    0.1] boot\r\n\\x1b]52;c;cm0gLXJmIH4=\\x07\\x1b]0;title\\x1b\\\r\n\\u{9b}2J \\x9b2J \\u{202e}evil\\xff\n\
         real\\x0dfake\n"
    );

    // The audit log: guest-chosen host and file names; still JSON lines.
    let mut log = audit::AuditLog::new(Vec::new());
    let event =
        serde_json::json!({ "event": "http", "host": "a\u{9b}b.com", "path": "x\u{1b}]52;c;eA==\u{7}\u{202e}" });
    log.record(&audit::Event::Untyped(event.clone()), 1).unwrap();
    std::fs::write(dir.join("audit.log"), log.get_ref()).unwrap();
    let (code, out, err) = sbx_in(&["log", "t", "--audit"], &env, t.path());
    assert_eq!(code, Some(0), "{err}");
    assert!(!out.contains(['\u{1b}', '\u{7}', '\u{9b}', '\u{202e}']), "{out:?}");
    assert!(out.contains(r#""host":"a\u009bb.com""#) && out.contains(r#"x\u001b]52;c;eA==\u0007\u202e"#), "{out}");
    let parsed: serde_json::Value = serde_json::from_str(out.trim_end()).unwrap();
    assert_eq!(parsed["host"], event["host"]);
    assert_eq!(parsed["path"], event["path"]);

    // `sbx ls` shows settings fields escaped.
    make_sandbox(&home, "u", &settings_json("u", "/w/\u{1b}[2Jx").replace("\"shell\"", "\"sh\\u001b]0;t\\u0007\""));
    let (code, out, err) = sbx_in(&["ls"], &env, t.path());
    assert_eq!(code, Some(0), "{err}");
    assert!(!out.contains('\u{1b}') && out.contains("sh\\x1b]0;t\\x07") && out.contains("/w/\\x1b[2Jx"), "{out}");
}

#[test]
fn run_keeps_the_guest_away_from_sbx_state_and_boot_files() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().canonicalize().unwrap();
    let (ws, assets) = (base.join("ws"), base.join("assets"));
    std::fs::create_dir_all(&ws).unwrap();
    fake_assets(&assets);
    let run = |home: &Path, extra: &[&str]| {
        let mut args = vec!["run", "shell", "--name", "s", "--workspace", ws.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "true"]);
        sbx_in(&args, &[("SBX_HOME", home), ("SBX_ASSETS", &assets)], &base)
    };
    // The state folder inside the workspace (not made yet), the workspace
    // itself, the workspace inside it, a read-only mount holding it.
    let cases = [
        (ws.join(".sbx"), vec![], "holds"),
        (ws.clone(), vec![], "is"),
        (base.clone(), vec![], "is inside"),
        (base.join("state"), vec!["--mount".to_string(), format!("{}:ro", base.display())], "holds"),
    ];
    for (home, extra, relation) in &cases {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let (code, _, err) = run(home, &extra);
        assert_eq!(code, Some(125), "{err}");
        assert!(err.contains(&format!("it {relation} sbx's state folder {}", home.display())), "{err}");
        assert!(err.contains("SBX_HOME"), "{err}");
        assert!(!ws.join(".sbx").exists() && !home.join("sandboxes").exists(), "refused before anything is made");
    }
    // A symbolic link does not hide the overlap.
    std::os::unix::fs::symlink(&ws, base.join("link")).unwrap();
    let (code, _, err) = run(&base.join("link/state"), &[]);
    assert_eq!(code, Some(125));
    assert!(err.contains(&format!("holds sbx's state folder {}", ws.join("state").display())), "{err}");

    // A writable share at or inside the folder the VMM boots from.
    let home = base.join("home");
    for mount in [assets.clone(), assets.join("images")] {
        let (code, _, err) = run(&home, &["--mount", &format!("{}:rw", mount.display())]);
        assert_eq!(code, Some(125), "{err}");
        let want = format!("Refusing to share {} read-write: it is or is inside {}", mount.display(), assets.display());
        assert!(err.contains(&want) && err.contains("SBX_ASSETS"), "{err}");
    }
    assert!(!home.join("sandboxes").exists(), "refused before anything is made");
}

#[test]
fn run_checks_a_sandbox_settings_like_user_input() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().canonicalize().unwrap();
    let (home, assets, ws) = (base.join("home"), base.join("assets"), base.join("ws"));
    std::fs::create_dir_all(ws.join("sub")).unwrap();
    fake_assets(&assets);
    std::os::unix::fs::symlink(&ws, base.join("link")).unwrap();
    let env = [("SBX_HOME", home.as_path()), ("SBX_ASSETS", assets.as_path())];
    let tampered = [
        ("ws", "not an absolute path".to_string()),
        ("/", "Refusing to share /".to_string()),
        (&*format!("{}/sub/..", ws.display()), format!("is not written as its real path {}", ws.display())),
        (&*format!("{}/link", base.display()), format!("is not written as its real path {}", ws.display())),
        (&*format!("{}/gone", base.display()), "No such file".to_string()),
    ];
    for (workspace, why) in &tampered {
        let dir = make_sandbox(&home, "t", &settings_json("t", workspace));
        let (code, _, err) = sbx_in(&["run", "shell", "--name", "t", "--", "true"], &env, &ws);
        assert_eq!(code, Some(125), "{err}");
        let file = dir.join("sandbox.json");
        assert!(err.contains(&format!("{}: the workspace {workspace} ", file.display())), "{err}");
        assert!(err.contains(why.as_str()), "{workspace}: {err}");
        assert!(!dir.join("disk.img").exists() && !dir.join("vmm.lock").exists(), "nothing started");
    }
    if let Some(user_home) = std::env::var_os("HOME").and_then(|h| PathBuf::from(h).canonicalize().ok()) {
        make_sandbox(&home, "t", &settings_json("t", user_home.to_str().unwrap()));
        let (code, _, err) = sbx_in(&["run", "shell", "--name", "t", "--", "true"], &env, &ws);
        assert_eq!(code, Some(125));
        assert!(err.contains("holds your home folder"), "{err}");
    }
    // Another real folder than the one asked for (here: the current one,
    // whose name the sandbox's is made from).
    let other = base.join("other");
    std::fs::create_dir_all(&other).unwrap();
    make_sandbox(&home, "shell-ws", &settings_json("shell-ws", other.to_str().unwrap()));
    let (code, _, err) = sbx_in(&["run", "shell", "--", "true"], &env, &ws);
    assert_eq!(code, Some(125));
    assert!(err.contains(&format!("shares {}, not {}", other.display(), ws.display())), "{err}");
    // Garbled settings, or settings of another sandbox: a clear error.
    for garbled in ["{\"name\":", "[1,2]", &settings_json("other", ws.to_str().unwrap())] {
        let dir = make_sandbox(&home, "g", garbled);
        let (code, _, err) = sbx_in(&["run", "shell", "--name", "g", "--", "true"], &env, &ws);
        assert_eq!(code, Some(125), "{err}");
        assert!(err.contains(&format!("Sandbox state in {} is corrupt", dir.join("sandbox.json").display())), "{err}");
    }
}

// ---- Governance: `sbx audit`, `sbx log --audit --json|--follow`, `sbx secret` scopes ----

/// A sandbox "g" in `home` whose audit log holds `n` allowed requests and
/// a refusal, as netstack writes them.
fn sandbox_with_audit(home: &Path, n: usize) -> PathBuf {
    let dir = make_sandbox(home, "g", &settings_json("g", "/w"));
    let rotation = audit::Rotation::default();
    let mut opened = audit::open(&dir.join("audit.log"), rotation, 1, |f| f).unwrap();
    for i in 0..n {
        let host = format!("h{i}.test\u{1b}]0;x\u{7}");
        opened
            .log
            .record(
                &audit::Event::Untyped(
                    serde_json::json!({"event": "http", "method": "GET", "host": host, "decision": "allow"}),
                ),
                5,
            )
            .unwrap();
    }
    opened
        .log
        .record(&audit::Event::Untyped(serde_json::json!({"event": "dns", "name": "evil.test", "decision": "deny"})), 6)
        .unwrap();
    dir
}

#[test]
fn audit_verify_reports_the_first_broken_line_and_exits_0_1_2() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    let dir = sandbox_with_audit(&home, 4);
    let env = [("SBX_HOME", home.as_path())];
    let (code, out, err) = sbx_in(&["audit", "verify", "g"], &env, t.path());
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("chain verified: seq 1 to 5"), "{out}");
    let log = dir.join("audit.log");
    let text = std::fs::read_to_string(&log).unwrap().replacen("h1.test", "h9.test", 1);
    std::fs::write(&log, text).unwrap();
    let (code, out, _) = sbx_in(&["audit", "verify", "g"], &env, t.path());
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("BROKEN: {} line 3 (seq 3): does not follow", log.display())), "{out}");
    let (code, out, _) = sbx_in(&["audit", "verify", log.to_str().unwrap()], &env, t.path());
    assert_eq!(code, Some(1), "a file too: {out}");
    let (code, _, err) = sbx_in(&["audit", "verify", "nope"], &env, t.path());
    assert_eq!(code, Some(2));
    assert!(err.contains("No sandbox named 'nope'"), "{err}");
}

#[test]
fn audit_anchors_catch_a_log_cut_back_and_refuse_the_sandbox_state() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    let dir = sandbox_with_audit(&home, 4);
    let env = [("SBX_HOME", home.as_path())];
    let anchors = t.path().join("anchors.log");
    let a = anchors.to_str().unwrap();
    let (code, _, err) = sbx_in(&["audit", "anchor", "g", "--to", a], &env, t.path());
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("audit log seq 5"), "{err}");
    let inside = dir.join("anchors.log");
    let (code, _, err) = sbx_in(&["audit", "anchor", "g", "--to", inside.to_str().unwrap()], &env, t.path());
    assert_eq!(code, Some(125));
    assert!(err.contains("Refusing to keep anchors in"), "{err}");
    let (code, out, _) = sbx_in(&["audit", "verify", "g", "--anchors", a], &env, t.path());
    assert_eq!(code, Some(0), "{out}");
    // The last two lines dropped: the chain alone cannot tell.
    let log = dir.join("audit.log");
    let text = std::fs::read_to_string(&log).unwrap();
    let kept: String = text.lines().take(3).map(|l| format!("{l}\n")).collect();
    std::fs::write(&log, kept).unwrap();
    let (code, _, _) = sbx_in(&["audit", "verify", "g"], &env, t.path());
    assert_eq!(code, Some(0));
    let (code, out, _) = sbx_in(&["audit", "verify", "g", "--anchors", a], &env, t.path());
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("BROKEN: the audit log ends at seq 3") && out.contains("up to seq 5"), "{out}");
}

#[test]
fn audit_log_json_is_the_lines_exactly_and_the_default_says_it_is_escaped() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    let dir = sandbox_with_audit(&home, 3);
    let env = [("SBX_HOME", home.as_path())];
    let written = std::fs::read_to_string(dir.join("audit.log")).unwrap();
    let (code, out, _) = sbx_in(&["log", "g", "--audit", "--json"], &env, t.path());
    assert_eq!(code, Some(0));
    // The evidence file's refusal is also in the kept log: not repeated.
    assert_eq!(out, written);
    let (code, out, err) = sbx_in(&["log", "g", "--audit"], &env, t.path());
    assert_eq!(code, Some(0));
    assert!(err.contains("escaped for the terminal"), "{err}");
    assert!(!out.contains('\u{1b}') && out.lines().count() == 4, "{out}");
    // Following a stopped sandbox: everything, then it ends.
    let (code, out, _) = sbx_in(&["log", "g", "--audit", "--json", "--follow", "--until-stopped"], &env, t.path());
    assert_eq!(code, Some(0));
    assert_eq!(out, written);
}

#[test]
fn audit_export_writes_jsonl_and_ocsf_with_the_sandbox_it_came_from() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    sandbox_with_audit(&home, 2);
    let env = [("SBX_HOME", home.as_path())];
    let (code, out, err) = sbx_in(&["audit", "export", "g", "--format", "jsonl", "--to", "-"], &env, t.path());
    assert_eq!(code, Some(0), "{err}");
    let recs: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(recs.len(), 3);
    assert_eq!(recs[0]["schema"], "sbx-audit/1");
    assert_eq!(
        (recs[0]["sandbox"].as_str(), recs[0]["agent"].as_str(), recs[0]["workspace"].as_str()),
        (Some("g"), Some("shell"), Some("/w"))
    );
    assert_eq!(recs[2]["event"]["name"], "evil.test");
    let to = t.path().join("out");
    let (code, _, err) =
        sbx_in(&["audit", "export", "--all", "--format", "ocsf", "--to", to.to_str().unwrap()], &env, t.path());
    assert_eq!(code, Some(0), "{err}");
    let text = std::fs::read_to_string(to.join("g.ocsf.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!((last["class_uid"].as_u64(), last["disposition"].as_str()), (Some(4003), Some("Blocked")));
    assert_eq!(last["metadata"]["product"]["name"], "sbx");
    let (code, _, err) = sbx_in(&["audit", "export", "g", "--format", "xml", "--to", "-"], &env, t.path());
    assert_eq!(code, Some(125));
    assert!(err.contains("expected jsonl or ocsf"), "{err}");
}

#[test]
fn audit_export_to_syslog_sends_one_rfc5424_message_per_record() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    sandbox_with_audit(&home, 2);
    let env = [("SBX_HOME", home.as_path())];
    // A stand-in for /dev/log: the datagram socket journald or a syslog
    // daemon would listen on.
    let socket = t.path().join("log.sock");
    let log = std::os::unix::net::UnixDatagram::bind(&socket).unwrap();
    log.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let to = format!("syslog:{}", socket.display());
    let (code, out, err) = sbx_in(&["audit", "export", "g", "--to", &to], &env, t.path());
    assert_eq!(code, Some(0), "{err}");
    assert!(out.is_empty(), "nothing on stdout: {out}");
    let mut got = Vec::new();
    let mut buf = vec![0u8; 70 * 1024];
    log.set_nonblocking(true).unwrap();
    while let Ok(n) = log.recv(&mut buf) {
        got.push(String::from_utf8(buf[..n].to_vec()).unwrap());
    }
    assert_eq!(got.len(), 3, "{got:?}");
    for m in &got {
        // <PRI>1 TIMESTAMP HOST APP PID MSGID SD MSG, facility authpriv.
        assert!(!m.chars().any(char::is_control), "the guest's bytes arrive escaped: {m:?}");
        let parts: Vec<&str> = m.splitn(8, ' ').collect();
        assert!(parts[0] == "<86>1" || parts[0] == "<85>1", "{m}");
        assert!(parts[1].ends_with('Z') && parts[1].len() == 20, "{m}");
        assert_eq!((parts[3], parts[5], parts[6]), ("sbx", "audit", "-"), "{m}");
        let rec: serde_json::Value = serde_json::from_str(parts[7]).unwrap();
        assert_eq!((rec["schema"].as_str(), rec["sandbox"].as_str()), (Some("sbx-audit/1"), Some("g")));
    }
    // The refusal (the last record, a denied name) is a notice, the rest info.
    assert!(got[2].starts_with("<85>1 ") && got[0].starts_with("<86>1 "), "{got:?}");
    // No listener: a clear error naming the socket.
    drop(log);
    let (code, _, err) = sbx_in(&["audit", "export", "g", "--to", &to], &env, t.path());
    assert_ne!(code, Some(0));
    assert!(err.contains("Cannot reach the system log at") && err.contains("log.sock"), "{err}");
}

/// `sbx secret ARGS` with the value `stdin`.
fn secret(config: &Path, args: &[&str], stdin: &str) -> (Option<i32>, String, String) {
    use std::io::Write;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sbx"));
    cmd.arg("secret").args(args).env("SBX_CONFIG", config);
    cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    // A command that reads no input (ls, rm) may end first: no broken pipe.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    let out = child.wait_with_output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn secrets_keep_their_scope_expiry_and_rotation_and_log_each_change() {
    let t = tempfile::tempdir().unwrap();
    let config = t.path().join("cfg");
    let ws = t.path().canonicalize().unwrap();
    let scope = format!("workspace={}", ws.display());
    let (code, _, err) = secret(&config, &["set", "anthropic", "--scope", &scope, "--expires", "30d"], "sk-one\n");
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = secret(&config, &["set", "openai"], "sk-two\n");
    assert_eq!(code, Some(0), "{err}");
    let (_, out, _) = secret(&config, &["ls"], "");
    let line = out.lines().find(|l| l.starts_with("anthropic\t")).unwrap();
    assert!(line.contains(&format!("\t{scope}\tstored\texpires 20")) && line.contains("\trotated 20"), "{line}");
    assert!(out.lines().any(|l| l.starts_with("openai\tglobal\tstored\tnever expires")), "{out}");
    assert!(!out.contains("sk-"), "{out}");
    let (code, _, err) = secret(&config, &["rotate", "anthropic", "--scope", &scope], "sk-three\n");
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("rotated, expires 20") && err.contains("the old value is gone"), "{err}");
    let (code, _, err) = secret(&config, &["rotate", "anthropic"], "x\n");
    assert_eq!(code, Some(125), "no global one to rotate");
    assert!(err.contains("No secret named 'anthropic'"), "{err}");
    let (code, _, err) = secret(&config, &["set", "x", "--expires", "yesterday"], "v\n");
    assert_eq!(code, Some(125));
    assert!(err.contains("Bad --expires 'yesterday'"), "{err}");
    let log = std::fs::read_to_string(config.join("secrets-audit.log")).unwrap();
    let actions: Vec<String> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["action"].as_str().unwrap().into())
        .collect();
    assert_eq!(actions, ["set", "set", "rotate"]);
    assert!(!log.contains("sk-"));
    let (code, out, _) =
        sbx_in(&["audit", "verify", config.join("secrets-audit.log").to_str().unwrap()], &[], t.path());
    assert_eq!(code, Some(0), "{out}");
}

/// `sbx` with `home` as SBX_HOME.
fn sbx_home(home: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sbx")).args(args).env("SBX_HOME", home).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn live_rules_of_a_stopped_sandbox_are_edited_in_its_file_and_explain_sees_them() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("sandboxes").join("box");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("sandbox.json"), r#"{"name":"box","agent":"shell","workspace":"/tmp","created_unix":0}"#)
        .unwrap();
    let h = home.path();
    let (code, out, err) = sbx_home(h, &["policy", "allow", "box", "api.example.com", "--for", "10m"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("live rule #1 added"), "{out}");
    let (code, _, _) = sbx_home(h, &["policy", "deny", "box", "evil.example.com:443", "--method", "POST"]);
    assert_eq!(code, Some(0));
    let (_, out, _) = sbx_home(h, &["policy", "ls", "box"]);
    assert!(out.contains("live #1: allow api.example.com ports 80,443") && out.contains("s left"), "{out}");
    assert!(out.contains("live #2: deny evil.example.com ports 443 methods POST (until reset"), "{out}");
    let (code, out, _) =
        sbx_home(h, &["policy", "explain", "--preset", "locked", "--sandbox", "box", "https://api.example.com/"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("allowed by live #1"), "{out}");
    let (code, _, err) = sbx_home(h, &["policy", "allow", "box", "a.com", "--until-exit"]);
    assert_eq!(code, Some(125));
    assert!(err.contains("not running"), "{err}");
    let (code, _, err) = sbx_home(h, &["approve", "box", "1"]);
    assert_eq!(code, Some(125));
    assert!(err.contains("nothing waits"), "{err}");
    assert!(sbx_home(h, &["policy", "rm", "box", "1"]).0 == Some(0));
    let (code, _, err) = sbx_home(h, &["policy", "rm", "box", "1"]);
    assert_eq!(code, Some(125));
    assert!(err.contains("no live rule #1"), "{err}");
    // A hostile file is refused, naming the cure; reset is that cure.
    std::fs::write(dir.join("live-policy.json"), "{\"version\":1,\"next_id\":1,\"rules\":[{}]}").unwrap();
    let (code, _, err) = sbx_home(h, &["policy", "ls", "box"]);
    assert_eq!(code, Some(125));
    assert!(err.contains("live-policy.json") && err.contains("sbx policy reset"), "{err}");
    assert_eq!(sbx_home(h, &["policy", "reset", "box"]).0, Some(0));
    let (_, out, _) = sbx_home(h, &["policy", "ls", "box"]);
    assert!(!out.contains("live #"), "{out}");
}

#[test]
fn cp_refuses_bad_arguments_before_any_guest() {
    // Usage errors: exit 2, with what to write instead.
    let (code, _, err) = sbx(&["cp", "a:/x", "b:/y"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("both arguments are in a sandbox"), "{err}");
    let (code, _, err) = sbx(&["cp", "./a", "/tmp/b"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("neither argument is NAME:PATH"), "{err}");
    let (code, _, err) = sbx(&["cp", "box:/", "/tmp/b"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("name a file or directory in the guest"), "{err}");
    let (code, _, err) = sbx(&["cp", "box:", "/tmp/b"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("give a path in the guest"), "{err}");
    let (code, _, err) = sbx(&["cp", "--max-size", "0", "box:/x", "/tmp/b"]);
    assert_eq!(code, Some(2), "{err}");
    // A sandbox that does not exist is sbx's failure, 125.
    let (code, _, err) = sbx(&["cp", "nope:/etc/hostname", "/tmp/x"]);
    assert_eq!(code, Some(125), "{err}");
    assert!(err.contains("No sandbox named 'nope'"), "{err}");
}

#[test]
fn run_help_and_policy_show_come_from_the_agent_presets() {
    let (code, out, _) = sbx(&["run", "--help"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("The agent: shell, claude, gemini, codex, copilot, opencode, aider"), "{out}");
    // What the code tables gave copilot before they became data.
    let (code, out, _) = sbx(&["policy", "show", "--agent", "copilot"]);
    assert_eq!(code, Some(0));
    let mut want = vec![
        "network rules for agent 'copilot' (denied if a deny rule matches, else allowed if an allow rule does, else denied):"
            .to_string(),
    ];
    for h in [
        "github.com",
        "api.github.com",
        "api.githubcopilot.com",
        "api.individual.githubcopilot.com",
        "api.business.githubcopilot.com",
        "api.enterprise.githubcopilot.com",
        "copilot-proxy.githubusercontent.com",
        "registry.npmjs.org",
        "pypi.org",
        "files.pythonhosted.org",
        "deb.debian.org",
        "security.debian.org",
    ] {
        want.push(format!("  agent  agent copilot: allow {h} ports 80,443"));
    }
    want.push("credential github: header 'authorization: Bearer <secret>' to api.github.com, api.githubcopilot.com, api.individual.githubcopilot.com, api.business.githubcopilot.com, api.enterprise.githubcopilot.com".into());
    assert_eq!(out.lines().collect::<Vec<_>>(), want, "{out}");
    let (code, out, _) = sbx(&["policy", "show", "--agent", "shell"]);
    assert_eq!(code, Some(0));
    assert!(!out.contains("agent shell:"), "the shell adds nothing: {out}");
    // The OAuth sign-ins are the presets' too.
    let (code, _, err) = sbx(&["secret", "oauth-import", "gemini"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("No OAuth sign-in known for agent 'gemini' (claude, codex)"), "{err}");
}

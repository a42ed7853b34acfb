//! Host side: `sbx` commands that need no guest, run as a user would.

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
    let (code, _, _) = sbx(&["policy", "explain", "--policy", f, "https://ok.example.com/"]);
    assert_eq!(code, Some(0));
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
    assert!(err.contains("Rule 1: give exactly one of 'allow' or 'deny'"), "{err}");
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

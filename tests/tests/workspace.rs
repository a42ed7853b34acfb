//! Host side: end-to-end test of workspace sharing (virtio-fs served by the
//! VMM under the file policy). One boot: reads and writes that reach the
//! host at once, each way out tried from inside the guest, hidden and
//! read-only paths, an extra read-only folder, and the audit log.

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt};
use std::process::Stdio;

use sbx_tests::{text, Sbx};

/// Runs a shell snippet in the sandbox as the agent; (status, stdout+stderr).
fn sh(sbx: &Sbx, script: &str) -> (i32, String) {
    let out = sbx.run(&["exec", "ws", "--user", "agent", "--", "sh", "-c", script], b"");
    (out.status.code().unwrap_or(-1), format!("{}{}", text(&out.stdout), text(&out.stderr)))
}

/// Asserts the snippet fails and prints nothing of `secret` (if any).
fn fails(sbx: &Sbx, script: &str, secret: &str) {
    let (code, out) = sh(sbx, script);
    assert_ne!(code, 0, "`{script}` should fail: {out}");
    assert!(secret.is_empty() || !out.contains(secret), "`{script}` leaked: {out}");
}

#[test]
#[ignore = "boots a guest: needs /dev/kvm, `cargo xtask kernel`, `cargo xtask image` and a release sbx; run by `cargo xtask test`"]
fn the_workspace_is_shared_under_the_policy() {
    let sbx = Sbx::new();
    let top = tempfile::tempdir().unwrap();
    let top_path = top.path().canonicalize().unwrap();
    let ws = top_path.join("project");
    let outside = top_path.join("outside");
    let extra = top_path.join("extra");
    for d in [ws.join("src"), ws.join(".git/hooks"), ws.join(".ssh"), outside.clone(), extra.clone()] {
        fs::create_dir_all(d).unwrap();
    }
    // A real repository on the host, with a token in its remote's URL.
    let git_init = std::process::Command::new("git").args(["init", "-q"]).arg(&ws).status().unwrap();
    assert!(git_init.success());
    let git_config = "[core]\n\thooksPath = .husky\n[include]\n\tpath = ../shared.gitconfig\n\
                      [remote \"origin\"]\n\turl = https://me:tok-secret-5@example.com/r.git\n";
    fs::write(ws.join("src/main.rs"), "fn main() {}\n").unwrap();
    fs::write(ws.join("id_rsa"), "rsa-secret-6\n").unwrap();
    fs::write(ws.join(".env"), "TOKEN=env-secret-1\n").unwrap();
    fs::write(ws.join(".ssh/id_ed25519"), "ssh-secret-2\n").unwrap();
    fs::write(ws.join("server.pem"), "pem-secret-3\n").unwrap();
    fs::write(ws.join(".git/config"), git_config).unwrap();
    let markers = top_path.join("markers");
    fs::create_dir_all(&markers).unwrap();
    fs::write(ws.join(".git/hooks/pre-commit"), "#!/bin/sh\n").unwrap();
    // Tools the user's next commit or `cd` runs, configured in the tree:
    // husky's hooks (core.hooksPath), a config git includes, pre-commit,
    // lefthook, direnv and what its .envrc adds to PATH.
    fs::create_dir_all(ws.join(".husky")).unwrap();
    fs::write(ws.join(".husky/pre-commit"), "#!/bin/sh\nexit 0\n").unwrap();
    fs::set_permissions(ws.join(".husky/pre-commit"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(ws.join("shared.gitconfig"), "[user]\n\tname = host\n").unwrap();
    fs::write(ws.join(".pre-commit-config.yaml"), "repos: []\n").unwrap();
    fs::write(ws.join("lefthook.yml"), "pre-commit:\n").unwrap();
    fs::write(ws.join(".envrc"), "PATH_add bin\n").unwrap();
    // Spellings a case-folding filesystem would take for the rules' names.
    fs::write(ws.join(".ENV"), "TOKEN=env-secret-7\n").unwrap();
    fs::write(ws.join("ID_ED25519"), "ssh-secret-8\n").unwrap();
    fs::write(outside.join("secret"), "outside-secret-4\n").unwrap();
    fs::write(extra.join("README"), "extra docs\n").unwrap();
    // Ways out already on the host: links, absolute and relative, to a
    // file and to a directory outside.
    symlink(outside.join("secret"), ws.join("abs-link")).unwrap();
    symlink("../outside/secret", ws.join("rel-link")).unwrap();
    symlink(&outside, ws.join("dir-link")).unwrap();

    let ws_s = ws.display().to_string();
    let extra_arg = format!("{}:ro", extra.display());
    let mut run = sbx
        .cmd()
        .args(["run", "shell", "--name", "ws", "--workspace", &ws_s, "--mount", &extra_arg, "--no-network"])
        .args(["--timeout", "1200", "--", "sh", "-c", "echo up; sleep 1000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    sbx.wait_running("ws");

    // Same path, the agent's cwd, the host's files.
    let (code, out) = sh(&sbx, "pwd; id -u; cat src/main.rs; ls -a");
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with(&format!("{ws_s}\n1000\nfn main() {{}}\n")), "{out}");
    for absent in [".env", ".ssh", "server.pem"] {
        assert!(!out.lines().any(|l| l.trim() == absent), "{absent} listed: {out}");
    }

    // Writes reach the host at once, as the folder's owner.
    let (code, out) =
        sh(&sbx, "echo written > out.txt && mkdir -p a/b && echo deep > a/b/c && mv a/b/c a/d && rm -r a/b");
    assert_eq!(code, 0, "{out}");
    assert_eq!(fs::read_to_string(ws.join("out.txt")).unwrap(), "written\n");
    assert_eq!(fs::read_to_string(ws.join("a/d")).unwrap(), "deep\n");
    assert!(!ws.join("a/b").exists());
    let owner = fs::metadata(&ws).unwrap().uid();
    assert_eq!(fs::metadata(ws.join("out.txt")).unwrap().uid(), owner, "files belong to the folder's owner");
    let out = sbx.run(&["exec", "ws", "--user", "root", "--", "sh", "-c", "echo by-root > root.txt"], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(fs::metadata(ws.join("root.txt")).unwrap().uid(), owner, "even when the guest's root writes");
    // And the host's changes reach the guest.
    fs::write(ws.join("from-host.txt"), "host edit\n").unwrap();
    let (_, out) = sh(&sbx, "cat from-host.txt");
    assert_eq!(out, "host edit\n");

    // Every way out fails, and nothing of the outside shows.
    fails(&sbx, "cat abs-link", "outside-secret");
    fails(&sbx, "cat rel-link", "outside-secret");
    fails(&sbx, "ls dir-link/ && cat dir-link/secret", "outside-secret");
    fails(&sbx, "cat ../outside/secret", "outside-secret");
    fails(&sbx, &format!("cat {}/secret", outside.display()), "outside-secret");
    fails(&sbx, "ln -s ../outside/secret planted && cat planted", "outside-secret");
    fails(&sbx, &format!("ln -s {}/secret planted2", outside.display()), "outside-secret");
    fails(&sbx, "ln src/main.rs hard", "");
    fails(&sbx, "mkfifo fifo", "");
    for planted in ["planted", "planted2", "hard", "fifo"] {
        assert!(fs::symlink_metadata(ws.join(planted)).is_err(), "{planted} was made on the host");
    }
    // Links inside, to writable paths, are fine.
    let (code, out) = sh(&sbx, "ln -s src/main.rs ok-link && cat ok-link");
    assert_eq!((code, out.as_str()), (0, "fn main() {}\n"));

    // Hidden: not readable, not creatable, whatever the spelling.
    fails(&sbx, "cat .env", "env-secret");
    fails(&sbx, "cat .ssh/id_ed25519", "ssh-secret");
    fails(&sbx, "cat server.pem", "pem-secret");
    fails(&sbx, "echo x > .env.local", "");
    fails(&sbx, "mkdir .aws", "");
    assert!(!ws.join(".env.local").exists() && !ws.join(".aws").exists());

    // Read-only: git's config and hooks; the rest of .git is writable.
    fails(&sbx, "echo '[alias] x = !evil' >> .git/config", "");
    fails(&sbx, "echo evil > .git/hooks/post-checkout", "");
    fails(&sbx, "rm .git/hooks/pre-commit", "");
    fails(&sbx, "mv .git git-moved", "");
    fails(&sbx, "mkdir decoy && mv decoy .git/hooks2 && echo x > .git/hooks2/y && mv .git/hooks2 .git/hooks", "");
    let out = sbx.run(&["exec", "ws", "--user", "root", "--", "sh", "-c", "echo evil >> .git/config"], b"");
    assert!(!out.status.success(), "the guest's root is refused too");
    let (code, out) = sh(&sbx, "echo ref > .git/FETCH_HEAD");
    assert_eq!(code, 0, "{out}");
    assert_eq!(fs::read_to_string(ws.join(".git/config")).unwrap(), git_config);
    assert_eq!(fs::read_to_string(ws.join(".git/hooks/pre-commit")).unwrap(), "#!/bin/sh\n");
    assert!(!ws.join(".git/hooks/post-checkout").exists());

    // Git: nothing the guest writes makes the host's git run its code.
    // Every known way in is refused...
    let m = markers.display();
    for attack in [
        format!("printf '[core]\\n\\tfsmonitor = touch {m}/m1\\n' > .git/config.worktree"),
        "echo /tmp > .git/commondir".to_string(),
        "mkdir -p .git/worktrees/x".to_string(),
        "mkdir -p .git/modules/x".to_string(),
        "mkdir -p .git/info && echo '* filter=x' > .git/info/attributes".to_string(),
        "echo ../../x > .git/objects/info/alternates".to_string(),
        format!("mkdir -p bare/objects bare/refs && echo 'ref: refs/heads/main' > bare/HEAD && printf '[core]\\n\\tfsmonitor = touch {m}/m2\\n' > bare/config"),
        format!("mkdir -p .git/objects/e/objects .git/objects/e/refs && echo 'ref: refs/heads/main' > .git/objects/e/HEAD && printf '[core]\\n\\tfsmonitor = touch {m}/m4\\n' > .git/objects/e/config"),
        "ln -s .git/objects tools2".to_string(),
    ] {
        fails(&sbx, &attack, "");
    }
    // ... while git itself works, in the host's repository and in new ones
    // the guest makes, whose git directories stay out of the folder.
    let (code, out) = sh(
        &sbx,
        &format!(
            "git add src/main.rs && git -c user.name=a -c user.email=a@b commit -qm host-repo && \
             git init -q nested && cd nested && echo hi > f && git add f && \
             git -c user.name=a -c user.email=a@b commit -qm guest-repo && git log --format=%s && \
             git config core.fsmonitor 'touch {m}/m3' && cd .. && mkdir sub && echo 'gitdir: ../bare' > sub/.git && \
             cat .git/config"
        ),
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("guest-repo\n"), "{out}");
    assert!(out.contains("url = https://example.com/r.git") && !out.contains("tok-secret-5"), "{out}");
    let host_log = std::process::Command::new("git").arg("-C").arg(&ws).args(["log", "--format=%s"]).output().unwrap();
    assert_eq!(text(&host_log.stdout), "host-repo\n", "{}", text(&host_log.stderr));
    assert!(!out.contains("env-secret-7") && !out.contains("ssh-secret-8"));
    assert!(ws.join("nested/f").exists() && !ws.join("nested/.git").exists() && !ws.join("sub/.git").exists());
    assert!(!ws.join("bare/config").exists());
    assert!(!ws.join(".git/objects/e/config").exists());
    let (code, out) = sh(&sbx, "mkdir .git/rebase-merge && echo 'exec x' > .git/rebase-merge/git-rebase-todo && cat .git/rebase-merge/git-rebase-todo");
    assert_eq!((code, out.as_str()), (0, "exec x\n"), "the guest has its rebase state");
    assert!(!ws.join(".git/rebase-merge").exists(), "kept in the shadow, where the host's git never runs it");
    for dir in [ws.clone(), ws.join("nested"), ws.join("sub"), ws.join("bare")] {
        let _ = std::process::Command::new("git").arg("-C").arg(&dir).arg("status").output().unwrap();
    }
    // The tools configured in the tree: each file they run or read is
    // read-only, and so is what .envrc puts on PATH.
    for attack in [
        format!("echo 'touch {m}/h1' >> .husky/pre-commit"),
        format!("printf '#!/bin/sh\\ntouch {m}/h2\\n' > .husky/post-commit"),
        "mv .husky husky-old".to_string(),
        format!("printf '[core]\\n\\tfsmonitor = touch {m}/h3\\n' >> shared.gitconfig"),
        format!("printf 'repos:\\n- repo: local\\n  hooks: [{{id: x, entry: touch {m}/h4, language: system}}]\\n' > .pre-commit-config.yaml"),
        format!("printf 'pre-commit:\\n  commands:\\n    x:\\n      run: touch {m}/h5\\n' > lefthook.yml"),
        format!("mkdir -p bin && printf '#!/bin/sh\\ntouch {m}/h6\\n' > bin/git && chmod +x bin/git"),
        "echo 'PATH_add /tmp' >> .envrc".to_string(),
        format!("printf '[core]\\n\\tfsmonitor = touch {m}/h7\\n' > .git/CONFIG"),
        "cat .ENV".to_string(),
        "cat ID_ED25519".to_string(),
    ] {
        fails(&sbx, &attack, "secret");
    }
    assert_eq!(fs::read_to_string(ws.join(".husky/pre-commit")).unwrap(), "#!/bin/sh\nexit 0\n");
    assert_eq!(fs::read_to_string(ws.join("shared.gitconfig")).unwrap(), "[user]\n\tname = host\n");
    assert!(
        !ws.join("bin/git").exists() && !ws.join(".git/CONFIG").exists() && !ws.join(".husky/post-commit").exists()
    );
    // The user's own commit runs husky's hook as it was, and nothing else.
    let commit = std::process::Command::new("git")
        .arg("-C")
        .arg(&ws)
        .args(["-c", "user.email=h@h", "commit", "--allow-empty", "-qm", "host-commit"])
        .output()
        .unwrap();
    assert!(commit.status.success(), "{}", text(&commit.stderr));
    let planted: Vec<_> = fs::read_dir(&markers).unwrap().collect();
    assert!(planted.is_empty(), "the host's git ran what the guest planted: {planted:?}");

    // Links are followed through the host's own: none leads out.
    fails(&sbx, "ln -s dir-link/secret chain", "");
    fails(&sbx, "mkdir d && ln -s .. d/b && ln -s d/b/.. climb", "");
    assert!(fs::symlink_metadata(ws.join("chain")).is_err() && fs::symlink_metadata(ws.join("climb")).is_err());
    // chmod never makes a host file writable to others; more secrets hidden.
    let (code, out) = sh(&sbx, "touch open && chmod 777 open");
    assert_eq!(code, 0, "{out}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(fs::metadata(ws.join("open")).unwrap().permissions().mode() & 0o7022, 0);
    fails(&sbx, "cat id_rsa", "rsa-secret");

    // The extra folder: readable at its own path, never writable.
    let (code, out) = sh(&sbx, &format!("cat {}/README", extra.display()));
    assert_eq!((code, out.as_str()), (0, "extra docs\n"));
    fails(&sbx, &format!("touch {}/new", extra.display()), "");
    assert!(!extra.join("new").exists());

    // The VMM killed mid-write (the guest crashes with it): what the guest
    // wrote is whole writes, nothing else changed, the sandbox's state and
    // audit log are intact.
    let mut writer = sbx
        .cmd()
        .args(["exec", "ws", "--user", "agent", "--", "sh", "-c", "while :; do echo 0123456789 >> growing; done"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while fs::metadata(ws.join("growing")).map(|m| m.len()).unwrap_or(0) < 110 {
        assert!(std::time::Instant::now() < deadline, "the writer never wrote");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    run.kill().unwrap();
    run.wait().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while writer.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "sbx exec outlived its sandbox");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let grown = fs::read(ws.join("growing")).unwrap();
    assert!(grown.len().is_multiple_of(11) && grown.chunks(11).all(|c| c == b"0123456789\n"), "torn write");
    assert_eq!(fs::read_to_string(ws.join("src/main.rs")).unwrap(), "fn main() {}\n");
    assert_eq!(fs::read_to_string(ws.join(".env")).unwrap(), "TOKEN=env-secret-1\n");
    assert_eq!(fs::read_to_string(extra.join("README")).unwrap(), "extra docs\n");
    let ls = text(&sbx.cmd().arg("ls").output().unwrap().stdout);
    assert!(ls.lines().any(|l| l.starts_with("ws ") && l.contains("stopped")), "{ls}");

    // The audit log: its chain verifies, and it has each change and each
    // refusal, with host paths.
    let log = sbx.cmd().args(["log", "ws", "--audit"]).output().unwrap();
    assert!(log.status.success(), "{}", text(&log.stderr));
    let log = text(&log.stdout);
    let has = |op: &str, decision: &str, path: &str| {
        log.lines().any(|l| {
            l.contains("\"event\":\"file\"")
                && l.contains(&format!("\"op\":\"{op}\""))
                && l.contains(&format!("\"decision\":\"{decision}\""))
                && l.contains(&format!("{ws_s}/{path}\""))
        })
    };
    assert!(has("create", "allow", "out.txt"), "{log}");
    assert!(has("write", "allow", "out.txt"), "{log}");
    assert!(has("rename", "allow", "a/b/c"), "{log}");
    assert!(has("delete", "allow", "a/b"), "{log}");
    assert!(has("lookup", "deny", ".env"), "{log}");
    assert!(has("symlink", "deny", "planted"), "{log}");
    assert!(has("link", "deny", "hard"), "{log}");
    assert!(has("mknod", "deny", "fifo"), "{log}");
    assert!(has("create", "deny", ".env.local"), "{log}");
    assert!(has("open", "deny", ".git/config"), "{log}");
    assert!(has("create", "deny", ".git/commondir"), "{log}");
    assert!(has("create", "deny", "bare/config"), "{log}");
    assert!(has("mkdir", "allow", "nested/.git"), "{log}");
    assert!(!log.contains("env-secret"), "file contents never go to the log");
}

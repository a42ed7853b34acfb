//! Host side, tests only: the embedded agent presets are exactly the
//! tables the code held before they became data, and bad presets files
//! are refused, each with its own error.

use super::*;

/// The network tables as the code had them (netstack/src/policy.rs
/// `AGENTS`, `COPILOT_HOSTS`, `AGENT_REGISTRIES`, `AGENT_CREDENTIALS`;
/// netstack/src/oauth.rs `PROVIDERS`), written out once.
const REGISTRIES: &[&str] =
    &["registry.npmjs.org", "pypi.org", "files.pythonhosted.org", "deb.debian.org", "security.debian.org"];

const HOSTS: &[(&str, &[&str])] = &[
    ("shell", &[]),
    ("claude", &["api.anthropic.com", "statsig.anthropic.com", "console.anthropic.com", "platform.claude.com"]),
    ("gemini", &["generativelanguage.googleapis.com", "oauth2.googleapis.com", "cloudcode-pa.googleapis.com"]),
    ("codex", &["api.openai.com", "chatgpt.com", "auth.openai.com"]),
    (
        "copilot",
        &[
            "github.com",
            "api.github.com",
            "api.githubcopilot.com",
            "api.individual.githubcopilot.com",
            "api.business.githubcopilot.com",
            "api.enterprise.githubcopilot.com",
            "copilot-proxy.githubusercontent.com",
        ],
    ),
    ("opencode", &["api.anthropic.com", "api.openai.com", "opencode.ai", "models.dev"]),
    ("aider", &["api.anthropic.com", "api.openai.com"]),
];

/// (agent, name, hosts, header, scheme, env)
type Cred = (&'static str, &'static str, &'static [&'static str], &'static str, Option<&'static str>, &'static str);
const ANTHROPIC: (&str, &[&str], &str, Option<&str>, &str) =
    ("anthropic", &["api.anthropic.com"], "x-api-key", None, "ANTHROPIC_API_KEY");
const OPENAI: (&str, &[&str], &str, Option<&str>, &str) =
    ("openai", &["api.openai.com"], "authorization", Some("Bearer"), "OPENAI_API_KEY");
const CREDENTIALS: &[Cred] = &[
    ("claude", ANTHROPIC.0, ANTHROPIC.1, ANTHROPIC.2, ANTHROPIC.3, ANTHROPIC.4),
    ("codex", OPENAI.0, OPENAI.1, OPENAI.2, OPENAI.3, OPENAI.4),
    ("gemini", "gemini", &["generativelanguage.googleapis.com"], "x-goog-api-key", None, "GEMINI_API_KEY"),
    (
        "copilot",
        "github",
        &[
            "api.github.com",
            "api.githubcopilot.com",
            "api.individual.githubcopilot.com",
            "api.business.githubcopilot.com",
            "api.enterprise.githubcopilot.com",
        ],
        "authorization",
        Some("Bearer"),
        "COPILOT_GITHUB_TOKEN",
    ),
    ("opencode", ANTHROPIC.0, ANTHROPIC.1, ANTHROPIC.2, ANTHROPIC.3, ANTHROPIC.4),
    ("opencode", OPENAI.0, OPENAI.1, OPENAI.2, OPENAI.3, OPENAI.4),
    ("aider", ANTHROPIC.0, ANTHROPIC.1, ANTHROPIC.2, ANTHROPIC.3, ANTHROPIC.4),
    ("aider", OPENAI.0, OPENAI.1, OPENAI.2, OPENAI.3, OPENAI.4),
];

/// (agent, api_hosts, token_hosts, token_path, id_token, credentials file)
type OAuth = (&'static str, &'static [&'static str], &'static [&'static str], &'static str, bool, &'static str);
const OAUTH: &[OAuth] = &[
    (
        "claude",
        &["api.anthropic.com"],
        &["console.anthropic.com", "platform.claude.com"],
        "/v1/oauth/token",
        false,
        ".claude/.credentials.json",
    ),
    ("codex", &["api.openai.com", "chatgpt.com"], &["auth.openai.com"], "/oauth/token", true, ".codex/auth.json"),
];

/// The run part as sbx's `AGENTS` had it: (name, image, program,
/// state_dir, default MiB, min MiB, env).
type Run = (
    &'static str,
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
    u64,
    u64,
    &'static [(&'static str, &'static str)],
);
const RUN: &[Run] = &[
    ("shell", "shell", None, None, 128, 64, &[]),
    (
        "claude",
        "agents",
        Some("claude"),
        Some("~/.claude"),
        1024,
        512,
        &[("DISABLE_AUTOUPDATER", "1"), ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")],
    ),
    ("gemini", "agents", Some("gemini"), Some("~/.gemini"), 1024, 512, &[("GEMINI_CLI_NO_RELAUNCH", "true")]),
    ("codex", "agents", Some("codex"), Some("~/.codex"), 1024, 512, &[]),
    (
        "copilot",
        "agents",
        Some("copilot"),
        Some("~/.copilot"),
        1024,
        512,
        &[("COPILOT_AUTO_UPDATE", "false"), ("COPILOT_PKG_CACHE_HOME", "/opt/sbx-copilot")],
    ),
    (
        "opencode",
        "agents",
        Some("opencode"),
        Some("~/.local/share/opencode"),
        1024,
        512,
        &[("OPENCODE_DISABLE_AUTOUPDATE", "true")],
    ),
    (
        "aider",
        "agents",
        Some("aider"),
        Some("~/.aider"),
        1024,
        512,
        &[("AIDER_CHECK_UPDATE", "false"), ("AIDER_ANALYTICS", "false"), ("LITELLM_LOCAL_MODEL_COST_MAP", "True")],
    ),
];

fn strings(v: &[impl ToString]) -> Vec<String> {
    v.iter().map(ToString::to_string).collect()
}

#[test]
fn embedded_presets_are_todays_tables() {
    let presets = embedded().expect("agents/presets.toml parses");
    let names: Vec<&str> = RUN.iter().map(|r| r.0).collect();
    assert_eq!(presets.names(), names);
    for (agent, own) in HOSTS {
        let p = presets.find(agent).unwrap();
        // Every agent but the bare shell also gets the registries, after its own hosts.
        let mut want = strings(own);
        if !own.is_empty() {
            want.extend(strings(REGISTRIES));
        }
        assert_eq!(strings(&p.network.hosts), want, "{agent} hosts");
        let creds: Vec<_> = p
            .network
            .credentials
            .iter()
            .map(|c| (c.name.clone(), strings(&c.hosts), c.header.clone(), c.scheme.clone(), c.env.clone()))
            .collect();
        let want: Vec<_> = CREDENTIALS
            .iter()
            .filter(|c| c.0 == *agent)
            .map(|c| (c.1.to_string(), strings(c.2), c.3.to_string(), c.4.map(str::to_string), Some(c.5.to_string())))
            .collect();
        assert_eq!(creds, want, "{agent} credentials");
        let oauth = p.network.oauth.as_ref().map(|o| {
            (
                strings(&o.api_hosts),
                strings(&o.token_hosts),
                o.token_path.clone(),
                o.id_token,
                o.credentials_file.clone(),
            )
        });
        let want = OAUTH
            .iter()
            .find(|o| o.0 == *agent)
            .map(|o| (strings(o.1), strings(o.2), o.3.to_string(), o.4, o.5.to_string()));
        assert_eq!(oauth, want, "{agent} oauth");
        if let Some(o) = &p.network.oauth {
            assert_eq!(o.agent, *agent);
        }
    }
    for (name, image, program, state_dir, default, min, env) in RUN {
        let p = presets.find(name).unwrap();
        assert_eq!(
            (p.image.as_str(), p.program.as_deref(), p.state_dir.as_deref(), p.default_memory_mib, p.min_memory_mib),
            (*image, *program, *state_dir, *default, *min),
            "{name}"
        );
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(p.env, env, "{name} env");
    }
    // The credentials a policy gets carry their agent's name.
    let claude = find("claude").unwrap().credentials();
    assert!(claude.iter().all(|c| c.origin == Origin::Agent("claude")));
}

/// A minimal valid file with `extra` appended to its one agent.
fn one(extra: &str) -> String {
    format!("registries = [\"pypi.org\"]\n[[agent]]\nname = \"a\"\nimage = \"agents\"\nmemory_mib = {{ default = 2, min = 1 }}\n{extra}\n")
}

fn refused(text: &str) -> Error {
    Presets::parse(text).expect_err(text)
}

#[test]
fn a_minimal_file_parses() {
    let p = Presets::parse(&one("hosts = [\"api.example.com\", \"*.example.org\"]\nregistries = true")).unwrap();
    assert_eq!(strings(&p.agents[0].network.hosts), ["api.example.com", "*.example.org", "pypi.org"]);
    assert!(p.agents[0].network.credentials.is_empty() && p.agents[0].network.oauth.is_none());
}

#[test]
fn unknown_keys_are_refused_naming_agent_and_key() {
    let e = refused(&one("colour = \"blue\""));
    assert!(matches!(&e, Error::UnknownKey { agent, key, .. } if agent == "a" && key == "colour"), "{e}");
    assert!(e.to_string().contains("agent 'a'") && e.to_string().contains("'colour'"), "{e}");
    let e = refused(&one(
        "[[agent.credential]]\nname = \"k\"\nhosts = [\"a.com\"]\nheader = \"x\"\nenv = \"K\"\nsecret = \"v\"",
    ));
    assert!(matches!(&e, Error::UnknownKey { key, .. } if key == "credential.secret"), "{e}");
    let e = refused(
        &one("").replace("memory_mib = { default = 2, min = 1 }", "memory_mib = { default = 2, min = 1, max = 3 }"),
    );
    assert!(matches!(&e, Error::UnknownKey { key, .. } if key == "memory_mib.max"), "{e}");
    let e = refused(&one("[agent.oauth]\napi_hosts = [\"a.com\"]\ntoken_hosts = [\"a.com\"]\ntoken_path = \"/t\"\nid_token = false\ncredentials_file = \"f\"\nclient_secret = \"x\""));
    assert!(matches!(&e, Error::UnknownKey { key, .. } if key == "oauth.client_secret"), "{e}");
    assert!(matches!(refused(&format!("colour = 1\n{}", one(""))), Error::UnknownTopKey(k) if k == "colour"));
}

#[test]
fn bad_hosts_are_refused_with_the_host_parsers_reason() {
    let e = refused(&one("hosts = [\"127.0.0.1\"]"));
    assert!(
        matches!(&e, Error::Host { agent, key, host, .. } if agent == "a" && key == "hosts" && host == "127.0.0.1"),
        "{e}"
    );
    assert!(e.to_string().contains("IP address"), "{e}");
    assert!(matches!(refused(&one("hosts = [\"a..b\"]")), Error::Host { .. }));
    assert!(matches!(refused(&one("hosts = [\"*\"]")), Error::AnyHost { .. }));
    assert!(matches!(refused(&one("").replace("pypi.org", "pypi.org:443")), Error::RegistryHost { .. }));
    let e = refused(&one("[agent.oauth]\napi_hosts = [\"*.a.com\"]\ntoken_hosts = [\"a.com\"]\ntoken_path = \"/t\"\nid_token = false\ncredentials_file = \"f\""));
    assert!(matches!(&e, Error::Host { key, .. } if key == "oauth.api_hosts"), "{e}");
    let e = refused(&one("[[agent.credential]]\nname = \"k\"\nhosts = [\"*\"]\nheader = \"x\"\nenv = \"K\""));
    assert!(matches!(&e, Error::Credential { error: credential::Error::AnyHost(_), .. }), "{e}");
}

#[test]
fn duplicates_are_refused() {
    let twice = format!("{}{}", one(""), one("").replace("registries = [\"pypi.org\"]\n", ""));
    assert!(matches!(refused(&twice), Error::DuplicateAgent(n) if n == "a"));
    let cred = "[[agent.credential]]\nname = \"k\"\nhosts = [\"a.com\"]\nheader = \"x\"\nenv = \"K\"\n";
    let e = refused(&one(&format!("{cred}{cred}")));
    assert!(matches!(&e, Error::Credential { error: credential::Error::Duplicate(n), .. } if n == "k"), "{e}");
}

#[test]
fn counts_and_lengths_have_limits() {
    let hosts: Vec<String> = (0..=MAX_HOSTS).map(|i| format!("\"h{i}.example.com\"")).collect();
    let e = refused(&one(&format!("hosts = [{}]", hosts.join(", "))));
    assert!(
        matches!(&e, Error::TooMany { agent, key, max } if agent == "a" && key == "hosts" && *max == MAX_HOSTS),
        "{e}"
    );
    let env: Vec<String> = (0..=MAX_ENV).map(|i| format!("\"K{i}=v\"")).collect();
    assert!(
        matches!(refused(&one(&format!("env = [{}]", env.join(", ")))), Error::TooMany { key, .. } if key == "env")
    );
    let agents: String =
        (0..=MAX_AGENTS).map(|i| one("").replace("name = \"a\"", &format!("name = \"a{i}\""))).collect();
    assert!(matches!(refused(&agents), Error::TooManyAgents));
    let long = "x".repeat(MAX_TEXT + 1);
    assert!(matches!(refused(&one(&format!("program = \"{long}\""))), Error::Text { key, .. } if key == "program"));
    assert!(matches!(refused(&" ".repeat(MAX_FILE + 1)), Error::TooLarge(_)));
}

#[test]
fn each_bad_value_has_its_error() {
    assert!(matches!(refused(&one("").replace("\"a\"", "\"A\"")), Error::AgentName(_)));
    assert!(matches!(refused(&one("").replace("\"agents\"", "\"../x\"")), Error::Image { .. }));
    assert!(matches!(refused(&one("").replace("min = 1", "min = 3")), Error::Memory { .. }));
    assert!(matches!(refused(&one("").replace("min = 1", "min = 0")), Error::Memory { .. }));
    assert!(matches!(refused(&one("env = [\"NOEQUALS\"]")), Error::Env { .. }));
    assert!(matches!(refused(&one("env = [\"1X=y\"]")), Error::Env { .. }));
    let oauth = |path: &str, file: &str| {
        one(&format!("[agent.oauth]\napi_hosts = [\"a.com\"]\ntoken_hosts = [\"a.com\"]\ntoken_path = \"{path}\"\nid_token = false\ncredentials_file = \"{file}\""))
    };
    assert!(Presets::parse(&oauth("/t", ".a/f.json")).is_ok());
    assert!(matches!(refused(&oauth("t", "f")), Error::TokenPath { .. }));
    assert!(matches!(refused(&oauth("/t?x", "f")), Error::TokenPath { .. }));
    assert!(matches!(refused(&oauth("/t", "../f")), Error::CredentialsFile { .. }));
    assert!(matches!(refused(&oauth("/t", "/etc/f")), Error::CredentialsFile { .. }));
    assert!(matches!(refused(&one("image = 3").replace("image = \"agents\"\n", "")), Error::Shape { .. }));
    assert!(matches!(refused("registries = []\n"), Error::NoAgents));
    assert!(matches!(refused("agent = 1\n"), Error::AgentsShape));
    assert!(matches!(refused("[[agent]]\nimage = \"x\"\n"), Error::Unnamed(1)));
    assert!(matches!(refused("[[agent]\n"), Error::Toml(_)));
}

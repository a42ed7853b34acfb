//! Host side: the agents `sbx run` knows — which image each boots, the
//! program it starts, how much memory it needs, the settings it runs
//! with. Their network needs and credentials are the network policy's
//! (`netstack::policy`, `sbx policy show --agent NAME`).

/// One agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agent {
    pub name: &'static str,
    /// The image in `target/sbx/images/` (`cargo xtask image NAME`).
    pub image: &'static str,
    /// The program `sbx run NAME` starts (arguments after `--` follow it);
    /// None: the image's shell.
    pub program: Option<&'static str>,
    /// Its state on the sandbox's own disk, kept from run to run.
    pub state_dir: Option<&'static str>,
    /// Guest memory by default and at the least, MiB: Node.js and the
    /// agents' native executables need far more than a shell.
    pub default_memory_mib: u64,
    pub min_memory_mib: u64,
    /// Settings in its environment: no self-update (its files are in the
    /// read-only image), no telemetry (the policy would refuse it anyway).
    pub env: &'static [(&'static str, &'static str)],
}

pub const AGENTS: &[Agent] = &[
    Agent {
        name: "shell",
        image: "shell",
        program: None,
        state_dir: None,
        default_memory_mib: 128,
        min_memory_mib: 64,
        env: &[],
    },
    Agent {
        name: "claude",
        image: "agents",
        program: Some("claude"),
        state_dir: Some("~/.claude"),
        default_memory_mib: 1024,
        min_memory_mib: 512,
        env: &[("DISABLE_AUTOUPDATER", "1"), ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")],
    },
    Agent {
        name: "gemini",
        image: "agents",
        program: Some("gemini"),
        state_dir: Some("~/.gemini"),
        default_memory_mib: 1024,
        min_memory_mib: 512,
        env: &[("GEMINI_CLI_NO_RELAUNCH", "true")],
    },
    Agent {
        name: "codex",
        image: "agents",
        program: Some("codex"),
        state_dir: Some("~/.codex"),
        default_memory_mib: 1024,
        min_memory_mib: 512,
        env: &[],
    },
    // The native Copilot CLI would unpack its package (235 MB) into
    // ~/.cache/copilot/pkg on its first run in each sandbox (minutes in a
    // guest); the image has it unpacked in /opt/sbx-copilot (xtask's
    // image_agents::COPILOT_PKG_CACHE), which it only reads.
    Agent {
        name: "copilot",
        image: "agents",
        program: Some("copilot"),
        state_dir: Some("~/.copilot"),
        default_memory_mib: 1024,
        min_memory_mib: 512,
        env: &[("COPILOT_AUTO_UPDATE", "false"), ("COPILOT_PKG_CACHE_HOME", "/opt/sbx-copilot")],
    },
    Agent {
        name: "opencode",
        image: "agents",
        program: Some("opencode"),
        state_dir: Some("~/.local/share/opencode"),
        default_memory_mib: 1024,
        min_memory_mib: 512,
        env: &[("OPENCODE_DISABLE_AUTOUPDATE", "true")],
    },
    // Aider is Python (numpy, scipy and litellm loaded at start); litellm
    // keeps its bundled model prices instead of fetching them from GitHub.
    Agent {
        name: "aider",
        image: "agents",
        program: Some("aider"),
        state_dir: Some("~/.aider"),
        default_memory_mib: 1024,
        min_memory_mib: 512,
        env: &[("AIDER_CHECK_UPDATE", "false"), ("AIDER_ANALYTICS", "false"), ("LITELLM_LOCAL_MODEL_COST_MAP", "True")],
    },
];

/// The agent called `name`, if sbx knows it.
pub fn find(name: &str) -> Option<&'static Agent> {
    AGENTS.iter().find(|a| a.name == name)
}

/// The agents' names, for errors and help.
pub fn names() -> Vec<&'static str> {
    AGENTS.iter().map(|a| a.name).collect()
}

impl Agent {
    /// The program and its arguments for `sbx run AGENT [-- ARGS]`: the
    /// agent's program with ARGS, or for the shell, ARGS as the command.
    pub fn argv(&self, args: &[String]) -> Vec<String> {
        match self.program {
            Some(p) => std::iter::once(p.to_string()).chain(args.iter().cloned()).collect(),
            None if args.is_empty() => vec!["/bin/sh".into()],
            None => args.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_start_their_program_with_the_arguments_given() {
        let args = vec!["-p".to_string(), "hi".to_string()];
        assert_eq!(find("claude").unwrap().argv(&args), vec!["claude", "-p", "hi"]);
        assert_eq!(find("codex").unwrap().argv(&[]), vec!["codex"]);
        assert_eq!(find("shell").unwrap().argv(&[]), vec!["/bin/sh"]);
        assert_eq!(find("shell").unwrap().argv(&args), args);
        assert!(find("cursor").is_none());
        assert_eq!(names(), vec!["shell", "claude", "gemini", "codex", "copilot", "opencode", "aider"]);
        assert_eq!(find("aider").unwrap().argv(&["--version".to_string()]), vec!["aider", "--version"]);
        for a in AGENTS {
            assert!(a.min_memory_mib <= a.default_memory_mib, "{}", a.name);
        }
    }
}

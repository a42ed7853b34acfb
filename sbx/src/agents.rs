//! Host side: the agents `sbx run` knows — which image each boots, the
//! program it starts, how much memory it needs, the settings it runs
//! with. Their network needs and credentials are the network policy's
//! (`netstack::policy`, `sbx policy show --agent NAME`). All of it is
//! data, `agents/presets.toml` at the repository root, built in and
//! parsed by [`netstack::preset`]; this module only borrows the parsed
//! values.

use std::sync::OnceLock;

/// One agent: its preset (`agents/presets.toml`, read by
/// [`netstack::preset`]), borrowed for the life of the program.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    pub env: Vec<(&'static str, &'static str)>,
}

impl Agent {
    fn of(p: &'static netstack::preset::Preset) -> Agent {
        Agent {
            name: &p.name,
            image: &p.image,
            program: p.program.as_deref(),
            state_dir: p.state_dir.as_deref(),
            default_memory_mib: p.default_memory_mib,
            min_memory_mib: p.min_memory_mib,
            env: p.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
        }
    }
}

static AGENTS: OnceLock<Vec<Agent>> = OnceLock::new();

/// Every agent sbx knows, in the presets file's order (none if the
/// built-in file were bad: [`load_error`] says why).
pub fn all() -> &'static [Agent] {
    AGENTS.get_or_init(|| match netstack::preset::embedded() {
        Ok(p) => p.agents.iter().map(Agent::of).collect(),
        Err(_) => Vec::new(),
    })
}

/// Why the built-in presets could not be read, if they could not.
pub fn load_error() -> Option<&'static netstack::preset::Error> {
    netstack::preset::embedded().err()
}

/// The agent called `name`, if sbx knows it.
pub fn find(name: &str) -> Option<&'static Agent> {
    all().iter().find(|a| a.name == name)
}

/// The agents' names, for errors and help.
pub fn names() -> Vec<&'static str> {
    all().iter().map(|a| a.name).collect()
}

/// The help of `sbx run AGENT`: the agents of the presets file.
pub fn run_help() -> String {
    format!("The agent: {} (agents/presets.toml).", names().join(", "))
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
        for a in all() {
            assert!(a.min_memory_mib <= a.default_memory_mib, "{}", a.name);
        }
        assert!(load_error().is_none());
        let copilot = find("copilot").unwrap();
        assert_eq!(copilot.env, [("COPILOT_AUTO_UPDATE", "false"), ("COPILOT_PKG_CACHE_HOME", "/opt/sbx-copilot")]);
        assert_eq!((copilot.default_memory_mib, find("shell").unwrap().min_memory_mib), (1024, 64));
        assert_eq!(
            run_help(),
            "The agent: shell, claude, gemini, codex, copilot, opencode, aider (agents/presets.toml)."
        );
    }
}

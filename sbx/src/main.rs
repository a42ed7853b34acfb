//! Host side: the `sbx` command line — parses the arguments, runs the
//! command, and prints its error as one chain ("cannot start sandbox …:
//! cannot open …: permission denied"). The work is in the `sbx` library
//! (`run`, `commands`) and the VMM library.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::disallowed_methods))]

use std::error::Error;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use sbx::admin::{self, Req};
use sbx::cli::{ApproveArgs, Cli, Command, LiveRuleArgs, PolicyCommand};
use sbx::escape::{self, Layout};
use sbx::{audit, commands, copy, run, secrets};

fn main() -> ExitCode {
    let started = Instant::now();
    let result: Result<ExitCode, Box<dyn Error>> = match Cli::parse().command {
        Command::Run(args) => run::run(&args, started).map_err(Into::into),
        Command::Exec(args) => commands::exec(args).map_err(Into::into),
        Command::Cp(args) => copy::command(args).map_err(Into::into),
        Command::Fetch { name } => sbx::clone::fetch(&name).map_err(Into::into),
        Command::Ls => commands::ls().map(|_| ExitCode::SUCCESS).map_err(Into::into),
        Command::Stop { name } => commands::stop(&name).map(|_| ExitCode::SUCCESS).map_err(Into::into),
        Command::Rm { name } => commands::rm(&name).map(|_| ExitCode::SUCCESS).map_err(Into::into),
        Command::Log { name, audit: false, .. } => {
            commands::log(&name, false).map(|_| ExitCode::SUCCESS).map_err(Into::into)
        }
        Command::Log { name, audit: true, json, follow, until_stopped } => {
            let stop = sbx::audit::stop_on_signals();
            audit::print_log(&name, json, follow, until_stopped, &stop).map(|_| ExitCode::SUCCESS).map_err(Into::into)
        }
        Command::Audit(cmd) => audit::command(&cmd),
        Command::Policy(PolicyCommand::Explain { url, policy, preset, method, sandbox }) => {
            commands::policy_explain(&url, policy.as_deref(), &preset, &method, sandbox.as_deref()).map_err(Into::into)
        }
        Command::Policy(PolicyCommand::Allow(a)) => live_rule("allow", a),
        Command::Policy(PolicyCommand::Deny(a)) => live_rule("deny", a),
        Command::Policy(PolicyCommand::Ls { name }) => admin::command(&name, Req::Ls {}).map_err(Into::into),
        Command::Policy(PolicyCommand::Rm { name, id }) => admin::command(&name, Req::Rm { id }).map_err(Into::into),
        Command::Policy(PolicyCommand::Reset { name }) => admin::command(&name, Req::Reset {}).map_err(Into::into),
        Command::Policy(PolicyCommand::Suggest { name }) => sbx::learn::suggest(&name).map_err(Into::into),
        Command::Policy(PolicyCommand::Test { name, policy }) => sbx::learn::test(&name, &policy).map_err(Into::into),
        Command::Approvals { name } => approvals(name.as_deref()),
        Command::Approve(a) => approve(a),
        Command::Reject { name, id } => admin::command(&name, Req::Reject { id }).map_err(Into::into),
        Command::Policy(PolicyCommand::Show { agent, policy }) => {
            commands::policy_show(&agent, policy.as_deref()).map(|_| ExitCode::SUCCESS).map_err(Into::into)
        }
        Command::Policy(PolicyCommand::ExplainFile { path, policy }) => {
            commands::explain_file(&path, policy.as_deref()).map(|_| ExitCode::SUCCESS).map_err(Into::into)
        }
        Command::Secret(cmd) => secrets::command(&cmd).map(|_| ExitCode::SUCCESS),
        Command::Ports(a) => {
            let action = match (a.publish, a.unpublish) {
                (Some(m), _) => sbx::ports::Action::Publish(m),
                (None, Some(p)) => sbx::ports::Action::Unpublish(p),
                (None, None) => sbx::ports::Action::List,
            };
            sbx::ports::command(&a.name, action).map_err(Into::into)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // Guest-controlled parts were escaped where they came in; the
            // whole chain is escaped here too, in case one was missed.
            eprintln!("sbx: {}", escape::escape(chain(e.as_ref()).as_bytes(), Layout::Lines));
            ExitCode::from(run::EXIT_SBX_ERROR)
        }
    }
}

/// `sbx policy allow|deny NAME HOST …`.
fn live_rule(action: &str, a: LiveRuleArgs) -> Result<ExitCode, Box<dyn Error>> {
    let for_secs = a.for_.as_deref().map(admin::parse_duration).transpose()?;
    let rule = netstack::live::RuleSpec {
        action: action.into(),
        host: a.host,
        methods: a.methods,
        path: a.path,
        for_secs,
        uses: a.uses,
        until_exit: a.until_exit,
        graphql_mutations: a.graphql_mutations,
    };
    Ok(admin::command(&a.name, Req::Add { rule })?)
}

/// `sbx approve NAME ID [--once | --for D | --always]`.
fn approve(a: ApproveArgs) -> Result<ExitCode, Box<dyn Error>> {
    let grant = match (a.for_.as_deref(), a.always) {
        (Some(d), _) => netstack::live::Grant::ForSecs(admin::parse_duration(d)?),
        (None, true) => netstack::live::Grant::Always,
        (None, false) => netstack::live::Grant::Once,
    };
    Ok(admin::command(&a.name, Req::Approve { id: a.id, grant })?)
}

/// `sbx approvals [NAME]`: one sandbox, or every running one.
fn approvals(name: Option<&str>) -> Result<ExitCode, Box<dyn Error>> {
    if let Some(name) = name {
        return Ok(admin::command(name, Req::Approvals {})?);
    }
    for sb in sbx::sandbox::Sandbox::list(&sbx::sandbox::home())? {
        if sb.running_pid().is_some() {
            println!("{}:", escape::line(&sb.settings.name));
            if let Err(e) = admin::command(&sb.settings.name, Req::Approvals {}) {
                eprintln!("sbx: {}", escape::escape(e.to_string().as_bytes(), Layout::Lines));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// An error and its sources, each once: "a: b: c" (a source whose text
/// its wrapper already carries is not repeated).
fn chain(e: &dyn Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot start sandbox 'a'")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn errors_print_as_one_chain_without_repeats() {
        let e = Outer(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "permission denied"));
        assert_eq!(chain(&e), "cannot start sandbox 'a': permission denied");
        let io = std::io::Error::other("disk full");
        assert_eq!(chain(&io), "disk full");
    }
}

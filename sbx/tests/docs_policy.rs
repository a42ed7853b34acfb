//! Host side (test only): every ```toml example in docs/policy.md is parsed
//! with the parser `sbx run --policy` uses (`SandboxPolicy::parse`, which
//! `SandboxPolicy::read` calls), so the policy reference cannot drift
//! from the code. A block marked ```toml,refused must be refused. A
//! failure names the block's line in docs/policy.md.

use sbx::policy_doc::SandboxPolicy;

/// The policy reference, read at compile time (a change to it rebuilds
/// this test).
const POLICY_MD: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/policy.md"));

/// The fewest examples the reference is expected to hold: a doc whose
/// fences stopped being recognised must not pass by checking nothing.
const MIN_BLOCKS: usize = 10;

#[derive(Debug, PartialEq, Eq)]
enum Expect {
    Parses,
    Refused,
    /// The machine's admin policy (`toml,admin`).
    Admin,
}

#[derive(Debug)]
struct Block {
    /// The line of the opening fence (1-based).
    line: usize,
    expect: Expect,
    text: String,
}

/// The ```toml and ```toml,refused blocks of `md`, in order. Any other
/// info string starting with `toml` is an error, so that a typo in a
/// marker does not silently skip a block.
fn toml_blocks(md: &str) -> Result<Vec<Block>, String> {
    let mut blocks = Vec::new();
    let mut open: Option<Block> = None;
    let mut in_other_fence = false;
    for (i, raw) in md.lines().enumerate() {
        let line = raw.trim_start();
        let n = i + 1;
        if let Some(block) = open.as_mut() {
            if line.trim_end() == "```" {
                blocks.push(open.take().expect("a block is open"));
            } else {
                block.text.push_str(raw);
                block.text.push('\n');
            }
            continue;
        }
        if in_other_fence {
            // Only a bare fence closes one (CommonMark: a closing fence
            // has no info string).
            in_other_fence = line.trim_end() != "```";
            continue;
        }
        let Some(info) = line.strip_prefix("```") else { continue };
        let expect = match info.trim() {
            "toml" => Expect::Parses,
            "toml,refused" => Expect::Refused,
            "toml,admin" => Expect::Admin,
            other if other.starts_with("toml") => {
                return Err(format!(
                    "docs/policy.md line {n}: unknown marker ```{other} (use toml, toml,refused or toml,admin)"
                ))
            }
            _ => {
                in_other_fence = true;
                continue;
            }
        };
        open = Some(Block { line: n, expect, text: String::new() });
    }
    if let Some(b) = open {
        return Err(format!("docs/policy.md line {}: the ```toml block is never closed", b.line));
    }
    Ok(blocks)
}

#[test]
fn every_toml_example_in_the_policy_reference_parses_as_marked() {
    let blocks = toml_blocks(POLICY_MD).unwrap();
    assert!(blocks.len() >= MIN_BLOCKS, "only {} ```toml blocks found in docs/policy.md", blocks.len());
    let mut failures = Vec::new();
    for b in &blocks {
        let origin = format!("docs/policy.md line {}", b.line);
        if b.expect == Expect::Admin {
            // The machine's policy (/etc/sbx/policy.toml), its own parser.
            if let Err(e) = sbx::machine_policy::parse(std::path::Path::new(&origin), b.text.as_bytes()) {
                failures.push(format!("{origin}: does not parse as the machine policy: {e}"));
            }
            continue;
        }
        match (SandboxPolicy::parse(&b.text, &origin), &b.expect) {
            (Ok(_), Expect::Parses) => {}
            // Every refusal says where the offending text is.
            (Err(e), Expect::Refused) if e.to_string().contains(", line ") => {}
            (Err(e), Expect::Refused) => failures.push(format!("{origin}: refused without a line and column: {e}")),
            (_, Expect::Admin) => {}
            (Err(e), Expect::Parses) => failures.push(format!("{origin}: does not parse: {e}")),
            (Ok(_), Expect::Refused) => failures.push(format!("{origin}: marked refused, but it parses")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(blocks.iter().any(|b| b.expect == Expect::Refused), "the reference shows what is refused, too");
}

#[test]
fn the_extractor_finds_blocks_and_their_lines() {
    let md = "# t\n```toml\nversion = 1\n```\n```sh\n```toml\n```\n```toml,refused\nversion = 3\n```\n";
    let blocks = toml_blocks(md).unwrap();
    assert_eq!(blocks.len(), 2, "a toml fence inside another fence is not a block");
    assert_eq!((blocks[0].line, &blocks[0].expect, blocks[0].text.as_str()), (2, &Expect::Parses, "version = 1\n"));
    assert_eq!((blocks[1].line, &blocks[1].expect), (8, &Expect::Refused));
    assert!(SandboxPolicy::parse(&blocks[1].text, "t").is_err());
    assert!(toml_blocks("```tomll\n```\n").unwrap_err().contains("line 1"));
    assert!(toml_blocks("```toml\nversion = 1\n").unwrap_err().contains("never closed"));
}

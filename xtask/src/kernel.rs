//! Host side (build machine): `cargo xtask kernel` — the guest kernel from
//! Debian's linux-source-6.1, our patches (kernel-config/patches) and our
//! config fragment (kernel-config/sbx.config) on top of tinyconfig. Cached
//! by a fingerprint of source version, patches, fragment and this recipe.
//! It says which of its five steps it is in; while compiling (minutes) it
//! prints every few seconds how many objects are done, of about how many
//! (the last build's count, kept beside the kernel), and the last file.
//! The source is Debian's package (apt shows its download); xtask itself
//! downloads nothing here.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::util::{self, Fingerprint};

const SOURCE_PACKAGE: &str = "linux-source-6.1";
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// Bump when the recipe below changes in a way that changes the output.
const RECIPE: &str = "kernel-recipe-2";
/// Extra compiler flags: call memset/memcpy instead of expanding them
/// inline as "rep stosb"/"rep movsb" (see kernel-config/README.md).
const KCFLAGS: &str = "-mmemset-strategy=libcall:-1:noalign -mmemcpy-strategy=libcall:-1:noalign";

/// Debian packages the build needs, with a file that shows each is there.
const BUILD_PACKAGES: &[(&str, &str)] = &[
    (SOURCE_PACKAGE, SOURCE_TARBALL),
    ("bc", "/usr/bin/bc"),
    ("bison", "/usr/bin/bison"),
    ("flex", "/usr/bin/flex"),
    ("make", "/usr/bin/make"),
    ("gcc", "/usr/bin/gcc"),
    ("libelf-dev", "/usr/include/libelf.h"),
    ("libssl-dev", "/usr/include/openssl/ssl.h"),
    ("patch", "/usr/bin/patch"),
    ("xz-utils", "/usr/bin/xz"),
    ("python3", "/usr/bin/python3"),
];

/// How often the compile step reports how far it is.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// The lines of make's output kept to show when it fails.
const TAIL_LINES: usize = 40;
/// Next to the kernel: how many objects the last build compiled, the
/// estimate of the next one's total.
const OBJECTS_FILE: &str = "objects";

fn step(n: usize, what: &str) {
    eprintln!("xtask: kernel step {n}/5: {what}");
}

pub fn out_dir() -> PathBuf {
    util::assets().join("kernel")
}

fn patches(config_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut list: Vec<PathBuf> = std::fs::read_dir(config_dir.join("patches"))
        .context("Cannot list kernel-config/patches")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "patch"))
        .collect();
    list.sort();
    Ok(list)
}

/// Parses a config fragment into option -> value (None: "is not set").
pub fn parse_fragment(text: &str) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("# CONFIG_") {
            if let Some(name) = rest.strip_suffix(" is not set") {
                out.insert(format!("CONFIG_{name}"), None);
            }
        } else if let Some((k, v)) = line.split_once('=') {
            if k.starts_with("CONFIG_") {
                out.insert(k.to_string(), Some(v.to_string()));
            }
        }
    }
    out
}

/// Options of `wanted` whose value in the final `.config` differs.
pub fn config_mismatches(wanted: &BTreeMap<String, Option<String>>, config: &str) -> Vec<String> {
    let have = parse_fragment(config);
    wanted
        .iter()
        .filter(|(k, v)| have.get(*k).cloned().unwrap_or(None) != **v)
        .map(|(k, v)| {
            format!(
                "{k}: want {}, got {}",
                v.as_deref().unwrap_or("n"),
                have.get(k).cloned().flatten().as_deref().unwrap_or("n")
            )
        })
        .collect()
}

/// One line of kbuild's (non-silent) output: `  CC      kernel/fork.o`.
/// Returns the target and whether it is a compiled object (CC or AS of a
/// `.o`); None for anything else (warnings, make's own chatter).
pub fn kbuild_line(line: &str) -> Option<(&str, bool)> {
    let rest = line.strip_prefix("  ")?;
    let (tag, target) = rest.split_once(char::is_whitespace)?;
    if tag.is_empty() || !tag.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_') {
        return None;
    }
    let target = target.trim_start();
    let target = target.strip_prefix("[M]").map_or(target, str::trim_start).trim_end();
    if target.is_empty() || target.contains(char::is_whitespace) {
        return None;
    }
    Some((target, matches!(tag, "CC" | "AS") && target.ends_with(".o")))
}

/// How far the compile step is: objects done, of about `estimate` (the
/// last build's count), and the last thing kbuild made.
#[derive(Default)]
pub struct Progress {
    pub objects: u64,
    pub estimate: Option<u64>,
    pub last: String,
}

impl Progress {
    /// Takes one line of make's output.
    pub fn line(&mut self, line: &str) {
        if let Some((target, object)) = kbuild_line(line) {
            self.objects += u64::from(object);
            self.last = target.to_string();
        }
    }

    pub fn report(&self) -> String {
        let of = match self.estimate {
            // The estimate may be short (patches or config grew): never
            // more than 99% before make is done.
            Some(total) if total > 0 => {
                format!(" of about {total} ({}%)", (self.objects * 100 / total).min(99))
            }
            _ => String::new(),
        };
        let last = if self.last.is_empty() { String::new() } else { format!(" ({})", self.last) };
        format!("compiling, {} objects done{of}{last}", self.objects)
    }
}

/// Runs the compile (make without -s, its stdout read here): a progress
/// line every PROGRESS_EVERY, the last TAIL_LINES lines of make's output
/// shown if it fails (its stderr, warnings and errors, goes straight to
/// ours). Returns the number of objects compiled.
fn compile(src: &Path, args: &[String], estimate: Option<u64>) -> Result<u64> {
    let desc = format!("make {} (in {})", args.join(" "), src.display());
    let mut child = Command::new("make")
        .args(args)
        .current_dir(src)
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("Cannot start {desc}"))?;
    let stdout = child.stdout.take().context("make's stdout")?;
    let mut progress = Progress { estimate, ..Progress::default() };
    let mut tail = std::collections::VecDeque::with_capacity(TAIL_LINES);
    let mut reported = Instant::now();
    let mut reader = std::io::BufReader::new(stdout);
    let mut buf = Vec::new();
    while reader.read_until(b'\n', &mut buf).context("Cannot read make's output")? > 0 {
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end_matches(['\n', '\r']);
        progress.line(line);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.to_string());
        buf.clear();
        if reported.elapsed() >= PROGRESS_EVERY {
            eprintln!("xtask: kernel: {}", progress.report());
            reported = Instant::now();
        }
    }
    let status = child.wait().with_context(|| format!("Cannot wait for {desc}"))?;
    if !status.success() {
        let tail: Vec<String> = tail.into_iter().collect();
        bail!("Command failed ({status}): {desc}; its last output:\n{}", tail.join("\n"));
    }
    Ok(progress.objects)
}

pub fn build(force: bool) -> Result<PathBuf> {
    let started = Instant::now();
    step(1, &format!("build packages and the source ({SOURCE_PACKAGE})"));
    util::ensure_packages(BUILD_PACKAGES)?;
    let config_dir = util::root().join("kernel-config");
    let fragment_path = config_dir.join("sbx.config");
    let version = util::output(Command::new("dpkg-query").args(["-W", "-f=${Version}", SOURCE_PACKAGE]))?;
    let mut fp = Fingerprint::default();
    fp.add("recipe", RECIPE.as_bytes()).add("source", version.as_bytes()).add("kcflags", KCFLAGS.as_bytes());
    fp.add_file(&fragment_path)?;
    let patch_list = patches(&config_dir)?;
    for p in &patch_list {
        fp.add_file(p)?;
    }
    let key = fp.hex();
    let out = out_dir();
    if !force && util::up_to_date(&out, &key, &["vmlinux", "System.map"]) {
        eprintln!("xtask: kernel up to date ({})", out.join("vmlinux").display());
        return Ok(out.join("vmlinux"));
    }

    let work = util::assets().join("kernel-build");
    let src = work.join(SOURCE_PACKAGE);
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("Cannot clean {}", work.display()))?;
    }
    std::fs::create_dir_all(&work)?;
    // The last build's count of objects, before out/ is rewritten.
    let estimate = std::fs::read_to_string(out.join(OBJECTS_FILE)).ok().and_then(|n| n.trim().parse().ok());
    step(2, &format!("unpacking {SOURCE_TARBALL} ({version}) and applying {} patches", patch_list.len()));
    util::run(Command::new("tar").arg("-xf").arg(SOURCE_TARBALL).arg("-C").arg(&work))?;
    for p in &patch_list {
        eprintln!("xtask: applying {}", p.file_name().unwrap_or_default().to_string_lossy());
        util::run(
            Command::new("patch").args(["-p1", "--forward", "--batch", "--quiet", "-i"]).arg(p).current_dir(&src),
        )?;
    }
    let make = |args: &[&str]| -> Result<()> { util::run(Command::new("make").args(args).current_dir(&src)) };
    step(3, "configuring (tinyconfig, kernel-config/sbx.config, olddefconfig)");
    make(&["-s", "tinyconfig"])?;
    // Its chatter (every redefined value) is not interesting; the check below is.
    util::output(
        Command::new("scripts/kconfig/merge_config.sh").args(["-m", ".config"]).arg(&fragment_path).current_dir(&src),
    )?;
    make(&["-s", "olddefconfig"])?;
    let fragment = std::fs::read_to_string(&fragment_path)?;
    let config = std::fs::read_to_string(src.join(".config"))?;
    let bad = config_mismatches(&parse_fragment(&fragment), &config);
    if !bad.is_empty() {
        bail!("kernel-config/sbx.config asks for options the kernel did not take:\n  {}", bad.join("\n  "));
    }
    let jobs = std::thread::available_parallelism().map(|n| n.get() + 1).unwrap_or(2);
    step(4, &format!("compiling vmlinux with {jobs} jobs (progress every {} s)", PROGRESS_EVERY.as_secs()));
    let objects = compile(&src, &[format!("-j{jobs}"), format!("KCFLAGS={KCFLAGS}"), "vmlinux".into()], estimate)?;
    eprintln!("xtask: kernel: compiled {objects} objects");
    step(5, &format!("installing vmlinux, System.map and config in {}", out.display()));

    std::fs::create_dir_all(&out)?;
    for f in ["vmlinux", "System.map", ".config"] {
        std::fs::copy(src.join(f), out.join(f.trim_start_matches('.'))).with_context(|| format!("Cannot copy {f}"))?;
    }
    std::fs::write(out.join(OBJECTS_FILE), format!("{objects}\n"))?;
    util::stamp(&out, &key)?;
    // The build tree is large; keep only the outputs.
    let _ = std::fs::remove_dir_all(&work);
    eprintln!("xtask: kernel ready after {:.0} s: {}", started.elapsed().as_secs_f64(), out.join("vmlinux").display());
    Ok(out.join("vmlinux"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragment_parsing_and_mismatches() {
        let frag = parse_fragment("# comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x\"\nnot config\n");
        assert_eq!(frag.len(), 3);
        assert_eq!(frag["CONFIG_B"], None);
        let config = "CONFIG_A=y\nCONFIG_B=y\n";
        let bad = config_mismatches(&frag, config);
        assert_eq!(bad, vec!["CONFIG_B: want n, got y".to_string(), "CONFIG_C: want \"x\", got n".to_string()]);
        assert!(config_mismatches(&parse_fragment("CONFIG_A=y\n# CONFIG_Z is not set\n"), config).is_empty());
    }

    #[test]
    fn kbuild_lines_are_counted_and_the_report_says_how_far() {
        assert_eq!(kbuild_line("  CC      kernel/fork.o"), Some(("kernel/fork.o", true)));
        assert_eq!(kbuild_line("  AS      arch/x86/entry/entry_64.o"), Some(("arch/x86/entry/entry_64.o", true)));
        assert_eq!(kbuild_line("  CC [M]  drivers/x.o"), Some(("drivers/x.o", true)));
        assert_eq!(kbuild_line("  HOSTCC  scripts/basic/fixdep"), Some(("scripts/basic/fixdep", false)));
        assert_eq!(kbuild_line("  LD      vmlinux.o"), Some(("vmlinux.o", false)));
        assert_eq!(kbuild_line("  CC      kernel/bounds.s"), Some(("kernel/bounds.s", false)));
        for other in ["make[1]: Entering directory '/x'", "kernel/fork.c:1: warning: x", "  ", "", "  cc  x.o"] {
            assert_eq!(kbuild_line(other), None, "{other:?}");
        }

        let mut p = Progress::default();
        assert_eq!(p.report(), "compiling, 0 objects done");
        for l in ["  HOSTCC  scripts/basic/fixdep", "  CC      init/main.o", "  AS      a.o", "make: chatter"] {
            p.line(l);
        }
        assert_eq!(p.report(), "compiling, 2 objects done (a.o)");
        p.estimate = Some(4);
        p.line("  LD      vmlinux.o");
        assert_eq!(p.report(), "compiling, 2 objects done of about 4 (50%) (vmlinux.o)");
        for _ in 0..10 {
            p.line("  CC      x.o");
        }
        assert_eq!(p.report(), "compiling, 12 objects done of about 4 (99%) (x.o)");
    }

    #[test]
    fn our_fragment_parses_and_patches_have_headers() {
        let dir = util::root().join("kernel-config");
        let frag = parse_fragment(&std::fs::read_to_string(dir.join("sbx.config")).unwrap());
        assert_eq!(frag.get("CONFIG_LEGACY_PTYS"), Some(&None));
        assert_eq!(frag.get("CONFIG_VIRTIO_MMIO"), Some(&Some("y".into())));
        for p in patches(&dir).unwrap() {
            let text = std::fs::read_to_string(&p).unwrap();
            let header = text.split("\n--- a/").next().unwrap();
            assert!(header.contains("Why:"), "{} has no 'Why:' header", p.display());
        }
    }
}

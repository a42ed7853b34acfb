//! Host side (build machine): `cargo xtask kernel` — the guest kernel from
//! Debian's linux-source-6.1, our patches (kernel-config/patches) and our
//! config fragment (kernel-config/sbx.config) on top of tinyconfig. Cached
//! by a fingerprint of source version, patches, fragment and this recipe.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

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

pub fn build(force: bool) -> Result<PathBuf> {
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
    eprintln!("xtask: unpacking {SOURCE_TARBALL} ({version})");
    util::run(Command::new("tar").arg("-xf").arg(SOURCE_TARBALL).arg("-C").arg(&work))?;
    for p in &patch_list {
        eprintln!("xtask: applying {}", p.file_name().unwrap_or_default().to_string_lossy());
        util::run(
            Command::new("patch").args(["-p1", "--forward", "--batch", "--quiet", "-i"]).arg(p).current_dir(&src),
        )?;
    }
    let make = |args: &[&str]| -> Result<()> { util::run(Command::new("make").args(args).current_dir(&src)) };
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
    eprintln!("xtask: building vmlinux with {jobs} jobs");
    make(&["-s", &format!("-j{jobs}"), &format!("KCFLAGS={KCFLAGS}"), "vmlinux"])?;

    std::fs::create_dir_all(&out)?;
    for f in ["vmlinux", "System.map", ".config"] {
        std::fs::copy(src.join(f), out.join(f.trim_start_matches('.'))).with_context(|| format!("Cannot copy {f}"))?;
    }
    util::stamp(&out, &key)?;
    // The build tree is large; keep only the outputs.
    let _ = std::fs::remove_dir_all(&work);
    eprintln!("xtask: kernel ready: {}", out.join("vmlinux").display());
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

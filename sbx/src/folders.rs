//! Host side: which host folders a sandbox may share, checked before
//! anything starts.
//!
//! Every folder to share — `--workspace`, each `--mount`, and the
//! workspace a sandbox's settings file names — passes [`check`]: it exists,
//! is a directory, is taken by its canonical path, and is neither `/` nor
//! the home folder nor one that holds it. The workspace read back from a
//! settings file must moreover already be canonical ([`check_stored`]), so
//! an edited file cannot widen the share through `..` or a symbolic link.
//!
//! What the guest must never reach through a share: sbx's own state
//! ([`check_state`]: settings, disks, logs, control sockets — no share may
//! be, hold or be inside it) and, through a read-write share, the files the
//! VMM boots from ([`boot_files_to_hide`]: kernel and images, which a
//! guest that could write them would choose for the next boot). A share at
//! or inside those is refused; one that holds them (the repository's
//! `target/sbx` when the repository is the workspace) gets them hidden.

use std::io;
use std::path::{Component, Path, PathBuf};

use thiserror::Error;

use crate::escape::{self, Layout};

#[derive(Debug, Error)]
pub enum Error {
    #[error("{what} {path}: {source}")]
    Unreadable { what: String, path: String, source: io::Error },
    #[error("{what} {path} is not a directory")]
    NotADirectory { what: String, path: String },
    #[error(
        "Refusing to share {path} with the agent ({what}): it is / or holds your home folder; share a project \
         folder instead (run sbx in it, or pass --workspace DIR)"
    )]
    TooBroad { what: String, path: String },
    #[error(
        "Refusing to share {share}: it {relation} sbx's state folder {state} (sandbox settings, disks, logs and \
         control sockets, which the guest must not reach); set SBX_HOME to a folder outside every shared folder, \
         or share another folder"
    )]
    OverlapsState { share: String, state: String, relation: &'static str },
    #[error(
        "Refusing to share {share} read-write: it is or is inside {boot}, which the VMM boots from (a guest that \
         could write there would choose the next boot's kernel or image); share it read-only (--mount DIR:ro) \
         or keep the kernel and images elsewhere (SBX_ASSETS, --kernel, --image)"
    )]
    InBootFiles { share: String, boot: String },
    #[error(
        "Cannot hide {boot} from the guest in the read-write share {share}: {why}; keep the kernel and images \
         outside it (SBX_ASSETS, --kernel, --image)"
    )]
    CannotHide { share: String, boot: String, why: &'static str },
    #[error(
        "{file}: the workspace {path} {why}; the file was changed outside sbx: restore it or remove the sandbox \
         (`sbx rm NAME`)"
    )]
    Settings { file: String, path: String, why: String },
    #[error(
        "Cannot make {file} read-only for the guest in the read-write share {share}: {why}; keep the policy and \
         CA files sbx reads at start outside the folders you share read-write"
    )]
    CannotProtect { share: String, file: String, why: &'static str },
    #[error(
        "Refusing to share {a} and {b} together: one is inside the other and at least one is read-write (the \
         guest would reach the same files under two file policies); share only the outer folder, or both read-only"
    )]
    Overlapping { a: String, b: String },
    #[error(
        "Refusing to share {share} read-write: it {relation} {admin}, the machine's admin policy and its audit \
         copies, which every sandbox obeys (a guest that could write there would rewrite the rules it runs \
         under, and running sandboxes reload them); share it read-only (--mount DIR:ro) or another folder"
    )]
    OverlapsAdmin { share: String, admin: String, relation: &'static str },
    #[error("Cannot resolve {what} {path}: {source}")]
    Resolve { what: String, path: String, source: io::Error },
}

type Result<T> = std::result::Result<T, Error>;

/// A path for an error message, escaped: it may come from a file the
/// user did not write.
fn show(path: &Path) -> String {
    escape::escape(path.as_os_str().as_encoded_bytes(), Layout::Line)
}

/// The home folder, canonical, if there is one.
fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from).and_then(|h| h.canonicalize().ok())
}

/// The check every folder to share passes (`what` names it in errors:
/// "Workspace", "--mount DIR:rw:"): it exists and is a directory, and it is
/// neither `/` nor the home folder nor a folder that holds the home
/// folder. Returns its canonical path, the one to share.
pub fn check(path: &Path, what: &str) -> Result<PathBuf> {
    let canonical =
        path.canonicalize().map_err(|source| Error::Unreadable { what: what.into(), path: show(path), source })?;
    if !canonical.is_dir() {
        return Err(Error::NotADirectory { what: what.into(), path: show(&canonical) });
    }
    if canonical.parent().is_none() || home_dir().is_some_and(|h| h.starts_with(&canonical)) {
        return Err(Error::TooBroad { what: what.trim_end_matches(':').into(), path: show(&canonical) });
    }
    Ok(canonical)
}

/// The workspace a sandbox's settings file `file` names, checked like user
/// input ([`check`]) and required to be written as its canonical path:
/// absolute, without `.`, `..` or a symbolic link on the way.
pub fn check_stored(file: &Path, path: &Path) -> Result<PathBuf> {
    let fail = |why: String| Error::Settings { file: show(file), path: show(path), why };
    if !path.is_absolute() {
        return Err(fail("is not an absolute path".into()));
    }
    let canonical = check(path, "workspace").map_err(|e| fail(format!("is refused ({e})")))?;
    if canonical != path {
        return Err(fail(format!("is not written as its real path {} ('..' or a symbolic link)", show(&canonical))));
    }
    Ok(canonical)
}

/// `path` made absolute with its symbolic links resolved, as far as it
/// exists; the rest (not there yet, so without links) is added as written
/// with `.` and `..` applied. For folders sbx makes on first use. A
/// symbolic link that leads nowhere is an error: what sbx would create
/// through it is not where the path says.
pub fn canonical_lenient(path: &Path) -> io::Result<PathBuf> {
    let absolute = if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir()?.join(path) };
    // Component by component: `out` is always real folders (canonical)
    // followed by names not there yet, so `..` is one step up in both.
    let mut out = PathBuf::from("/");
    for c in absolute.components() {
        match c {
            Component::Prefix(_) | Component::RootDir => out = PathBuf::from("/"),
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => {
                let next = out.join(name);
                out = match next.symlink_metadata() {
                    Ok(_) => next.canonicalize().map_err(|e| match e.kind() {
                        io::ErrorKind::NotFound => {
                            io::Error::new(e.kind(), format!("{} is a symbolic link that leads nowhere", show(&next)))
                        }
                        _ => e,
                    })?,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => next,
                    Err(e) => return Err(e),
                };
            }
        }
    }
    Ok(out)
}

/// Refuses any share (canonical folders) that is, holds or is inside
/// sbx's state folder `state` (canonical), read-only or not.
pub fn check_state(state: &Path, shares: &[(PathBuf, bool)]) -> Result<()> {
    for (share, _) in shares {
        if let Some(relation) = relation(share, state) {
            return Err(Error::OverlapsState { share: show(share), state: show(state), relation });
        }
    }
    Ok(())
}

/// How `share` overlaps `dir` (both canonical): "is", "holds", "is
/// inside", or None.
fn relation(share: &Path, dir: &Path) -> Option<&'static str> {
    if share == dir {
        Some("is")
    } else if dir.starts_with(share) {
        Some("holds")
    } else if share.starts_with(dir) {
        Some("is inside")
    } else {
        None
    }
}

/// That no read-write share is, holds or is inside one of `admin`
/// (canonical): the machine policy's folder and its `audit_copy` folder.
/// Read-only shares of them are allowed: the policy is no secret from
/// the user whose sandbox obeys it, and reading it changes nothing.
pub fn check_admin(admin: &[PathBuf], shares: &[(PathBuf, bool)]) -> Result<()> {
    for (share, read_only) in shares {
        for a in admin.iter().filter(|_| !read_only) {
            if let Some(relation) = relation(share, a) {
                return Err(Error::OverlapsAdmin { share: show(share), admin: show(a), relation });
            }
        }
    }
    Ok(())
}

/// The longest hidden-path pattern the file policy takes (bytes).
const MAX_PATTERN: usize = 256;

/// The file-policy pattern that covers `file` (canonical) and all below it
/// in `share` (canonical), anchored at the share's root; None when the
/// file is not in the share. `cannot` names the failure.
fn anchored_pattern(share: &Path, file: &Path, cannot: impl Fn(&'static str) -> Error) -> Result<Option<String>> {
    let Ok(rel) = file.strip_prefix(share) else { return Ok(None) };
    let mut names = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => names.push(n.to_str().ok_or_else(|| cannot("its path is not UTF-8"))?),
            _ => return Err(cannot("its path is not plain names")),
        }
    }
    // Anchored at the share's root, the path and all below it ("**" also
    // matches nothing: the path itself).
    let pattern = format!("{}/**", names.join("/"));
    if pattern.len() > MAX_PATTERN {
        return Err(cannot("its path is too long"));
    }
    Ok(Some(pattern))
}

/// For each share (canonical folder, read-only), the file-policy patterns
/// that hide the boot files `boot` (canonical: the assets folder, the
/// kernel, the image folder) in it. Only read-write shares need them; a
/// read-write share at or inside a boot file's folder is refused.
pub fn boot_files_to_hide(boot: &[PathBuf], shares: &[(PathBuf, bool)]) -> Result<Vec<Vec<String>>> {
    let mut out = Vec::with_capacity(shares.len());
    for (share, read_only) in shares {
        let mut hide = Vec::new();
        for b in boot.iter().filter(|_| !read_only) {
            if share.starts_with(b) {
                return Err(Error::InBootFiles { share: show(share), boot: show(b) });
            }
            let cannot = |why| Error::CannotHide { share: show(share), boot: show(b), why };
            hide.extend(anchored_pattern(share, b, cannot)?);
        }
        out.push(hide);
    }
    Ok(out)
}

/// For each share, the file-policy patterns that make read-only the files
/// sbx reads when a sandbox starts (`--policy`, `--upstream-ca`): in a
/// read-write share the guest could otherwise rewrite what the next `sbx
/// run` trusts (a credential bound to its own host, loopback opened, the
/// user's hidden rules dropped). Each file is covered both where it was
/// named (a symbolic link there, which the guest could point elsewhere)
/// and where it really is. Anchored patterns also keep the folders above
/// it from being renamed or replaced (`FsPolicy::protects_below`).
pub fn start_files_to_protect(files: &[PathBuf], shares: &[(PathBuf, bool)]) -> Result<Vec<Vec<String>>> {
    let mut places = Vec::new();
    for f in files {
        let named = match (f.parent(), f.file_name()) {
            (Some(dir), Some(name)) => canonical_lenient(dir).map(|d| d.join(name)),
            _ => canonical_lenient(f),
        }
        .map_err(|source| Error::Resolve { what: "the file".into(), path: show(f), source })?;
        let real =
            canonical_lenient(f).map_err(|source| Error::Resolve { what: "the file".into(), path: show(f), source })?;
        places.push((f, named));
        places.push((f, real));
    }
    let mut out = Vec::with_capacity(shares.len());
    for (share, read_only) in shares {
        let mut protect = Vec::new();
        for (f, place) in places.iter().filter(|_| !read_only) {
            let cannot = |why| Error::CannotProtect { share: show(share), file: show(f), why };
            if let Some(p) = anchored_pattern(share, place, cannot)? {
                if !protect.contains(&p) {
                    protect.push(p);
                }
            }
        }
        out.push(protect);
    }
    Ok(out)
}

/// Refuses two shares where one is, or is inside, the other, unless both
/// are read-only: the guest would reach the same files through two file
/// servers, each applying the file policy from its own root (a rule
/// anchored at the workspace's root, a git directory found above the inner
/// share's root, do not hold in the inner share).
pub fn check_overlaps(shares: &[(PathBuf, bool)]) -> Result<()> {
    for (i, (a, a_ro)) in shares.iter().enumerate() {
        for (b, b_ro) in &shares[i + 1..] {
            if (a.starts_with(b) || b.starts_with(a)) && !(*a_ro && *b_ro) {
                return Err(Error::Overlapping { a: show(a), b: show(b) });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(base: &Path, rel: &str) -> PathBuf {
        let p = base.join(rel);
        std::fs::create_dir_all(&p).unwrap();
        p.canonicalize().unwrap()
    }

    #[test]
    fn folders_to_share_are_checked_and_made_canonical() {
        let t = tempfile::tempdir().unwrap();
        let proj = dir(t.path(), "proj");
        assert_eq!(check(&t.path().join("proj/../proj/."), "Workspace").unwrap(), proj);
        std::os::unix::fs::symlink(&proj, t.path().join("link")).unwrap();
        assert_eq!(check(&t.path().join("link"), "Workspace").unwrap(), proj, "the link's target is shared");
        let e = check(Path::new("/no/such/dir"), "Workspace").unwrap_err().to_string();
        assert!(e.starts_with("Workspace /no/such/dir: "), "{e}");
        std::fs::write(proj.join("f"), "").unwrap();
        let e = check(&proj.join("f"), "--mount f:rw:").unwrap_err().to_string();
        assert!(e.contains("is not a directory"), "{e}");
        let e = check(Path::new("/"), "Workspace").unwrap_err().to_string();
        assert!(e.starts_with("Refusing to share / with the agent"), "{e}");
        if let Some(home) = home_dir() {
            assert!(matches!(check(&home, "x"), Err(Error::TooBroad { .. })), "the home folder");
            if let Some(parent) = home.parent() {
                assert!(matches!(check(parent, "x"), Err(Error::TooBroad { .. })), "a folder holding it");
            }
        }
    }

    #[test]
    fn a_stored_workspace_must_be_canonical_and_allowed() {
        let t = tempfile::tempdir().unwrap();
        let proj = dir(t.path(), "proj");
        let file = t.path().join("sandbox.json");
        assert_eq!(check_stored(&file, &proj).unwrap(), proj);
        std::os::unix::fs::symlink(&proj, t.path().join("link")).unwrap();
        let tampered = [
            (PathBuf::from("proj"), "not an absolute path"),
            (proj.join(".."), "not written as its real path"),
            (proj.join("../proj"), "not written as its real path"),
            (t.path().canonicalize().unwrap().join("link"), "not written as its real path"),
            (PathBuf::from("/"), "Refusing to share /"),
            (proj.join("gone"), "No such file"),
        ];
        for (path, why) in tampered {
            let e = check_stored(&file, &path).unwrap_err().to_string();
            assert!(e.starts_with(&format!("{}: the workspace ", file.display())), "{e}");
            assert!(e.contains(why), "{path:?}: {e}");
        }
        if let Some(home) = home_dir() {
            let e = check_stored(&file, &home).unwrap_err().to_string();
            assert!(e.contains("holds your home folder"), "{e}");
        }
        let e = check_stored(&file, Path::new("/tmp/\u{1b}]52;c;eA==\u{7}")).unwrap_err().to_string();
        assert!(!e.contains('\u{1b}') && e.contains("\\x1b]52"), "escaped: {e}");
    }

    #[test]
    fn lenient_canonical_paths_resolve_what_exists() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().canonicalize().unwrap();
        let real = dir(&base, "real");
        std::os::unix::fs::symlink(&real, base.join("link")).unwrap();
        assert_eq!(canonical_lenient(&base.join("link/new/deeper")).unwrap(), real.join("new/deeper"));
        assert_eq!(canonical_lenient(&base.join("nothere/../link/x")).unwrap(), real.join("x"));
        assert_eq!(canonical_lenient(&base.join("link")).unwrap(), real);
        std::os::unix::fs::symlink(base.join("missing"), base.join("dangling")).unwrap();
        assert!(canonical_lenient(&base.join("dangling/state")).is_err());
    }

    #[test]
    fn no_share_overlaps_the_state_folder() {
        let t = tempfile::tempdir().unwrap();
        let (ws, state) = (dir(t.path(), "ws"), dir(t.path(), "state"));
        assert!(check_state(&state, &[(ws.clone(), false), (dir(t.path(), "other"), true)]).is_ok());
        for (share, relation) in [(state.clone(), "is"), (t.path().canonicalize().unwrap(), "holds")] {
            let e = check_state(&state, &[(ws.clone(), false), (share.clone(), true)]).unwrap_err().to_string();
            assert!(e.contains(&format!("it {relation} sbx's state folder {}", state.display())), "{e}");
            assert!(e.contains(&share.display().to_string()) && e.contains("SBX_HOME"), "{e}");
        }
        let inside = dir(&state, "sandboxes/x");
        let e = check_state(&state, &[(inside, false)]).unwrap_err().to_string();
        assert!(e.contains("is inside"), "{e}");
        // A name that only starts the same is another folder.
        assert!(check_state(&state, &[(dir(t.path(), "state2"), false)]).is_ok());
    }

    #[test]
    fn no_read_write_share_reaches_the_admin_policy_or_its_audit_copies() {
        let t = tempfile::tempdir().unwrap();
        let (etc, copies, ws) = (dir(t.path(), "etc/sbx"), dir(t.path(), "var/log/sbx"), dir(t.path(), "ws"));
        let admin = [etc.clone(), copies.clone()];
        assert!(check_admin(&admin, &[(ws.clone(), false)]).is_ok());
        let cases = [
            (etc.clone(), "is"),
            (etc.parent().unwrap().to_path_buf(), "holds"),
            (dir(&etc, "sub"), "is inside"),
            (copies.clone(), "is"),
            (dir(&copies, "1000"), "is inside"),
        ];
        for (share, relation) in cases {
            let e = check_admin(&admin, &[(ws.clone(), false), (share.clone(), false)]).unwrap_err().to_string();
            assert!(e.contains(&format!("{} read-write: it {relation} ", share.display())), "{e}");
            assert!(e.contains("--mount DIR:ro"), "{e}");
            // Read-only, it may be shared.
            assert!(check_admin(&admin, &[(ws.clone(), false), (share, true)]).is_ok());
        }
    }

    #[test]
    fn files_read_at_start_are_read_only_in_writable_shares() {
        use vmm::fs::policy::{Access, FsPolicy};
        let t = tempfile::tempdir().unwrap();
        let repo = dir(t.path(), "repo");
        std::fs::create_dir_all(repo.join("conf")).unwrap();
        std::fs::write(repo.join("conf/policy.toml"), "version = 1\n").unwrap();
        std::fs::write(repo.join("ca.crt"), "").unwrap();
        std::os::unix::fs::symlink("conf/policy.toml", repo.join("p.toml")).unwrap();
        let outside = t.path().canonicalize().unwrap().join("elsewhere.toml");
        std::fs::write(&outside, "").unwrap();
        let files = [repo.join("p.toml"), repo.join("ca.crt"), outside];
        let got = start_files_to_protect(&files, &[(repo.clone(), false), (repo.clone(), true)]).unwrap();
        assert_eq!(got[0], ["p.toml/**", "conf/policy.toml/**", "ca.crt/**"], "the link and its target");
        assert!(got[1].is_empty(), "a read-only share needs nothing");
        let policy = FsPolicy::with(&[], &got[0]).unwrap();
        assert_eq!(policy.access(Path::new("conf/policy.toml"), false), Access::ReadOnly);
        assert_eq!(policy.access(Path::new("p.toml"), false), Access::ReadOnly);
        assert_eq!(policy.access(Path::new("ca.crt"), false), Access::ReadOnly);
        assert_eq!(policy.access(Path::new("sub/ca.crt"), false), Access::ReadWrite, "anchored, not any depth");
        assert!(policy.protects_below(Path::new("conf")), "conf/ cannot be renamed away and replaced");
    }

    #[test]
    fn overlapping_shares_are_refused_unless_all_read_only() {
        let t = tempfile::tempdir().unwrap();
        let (ws, sub, other) = (dir(t.path(), "ws"), dir(t.path(), "ws/sub"), dir(t.path(), "other"));
        assert!(check_overlaps(&[(ws.clone(), false), (other.clone(), false)]).is_ok());
        assert!(check_overlaps(&[(ws.clone(), true), (sub.clone(), true)]).is_ok());
        for shares in [
            vec![(ws.clone(), false), (sub.clone(), true)],
            vec![(ws.clone(), true), (sub.clone(), false)],
            vec![(other.clone(), true), (sub.clone(), false), (ws.clone(), false)],
            vec![(ws.clone(), false), (ws.clone(), false)],
        ] {
            let e = check_overlaps(&shares).unwrap_err().to_string();
            assert!(e.starts_with("Refusing to share") && e.contains("one is inside the other"), "{e}");
        }
        let (ws2, _) = (dir(t.path(), "ws2"), ());
        assert!(check_overlaps(&[(ws, false), (ws2, false)]).is_ok(), "a name that only starts the same");
    }

    #[test]
    fn boot_files_are_hidden_in_or_refused_as_writable_shares() {
        let t = tempfile::tempdir().unwrap();
        let repo = dir(t.path(), "repo");
        let assets = dir(&repo, "target/sbx");
        let kernel = assets.join("kernel/vmlinux");
        let boot = [assets.clone(), kernel, dir(&assets, "images/shell")];
        let hide = boot_files_to_hide(&boot, &[(repo.clone(), false), (repo.clone(), true)]).unwrap();
        assert_eq!(hide[0], ["target/sbx/**", "target/sbx/kernel/vmlinux/**", "target/sbx/images/shell/**"]);
        assert!(hide[1].is_empty(), "read-only: nothing to hide");
        let policy = vmm::fs::policy::FsPolicy::with(&hide[0], &[]).unwrap();
        use vmm::fs::policy::Access;
        assert_eq!(policy.access(Path::new("target/sbx"), true), Access::Hidden);
        assert_eq!(policy.access(Path::new("target/sbx/kernel/vmlinux"), false), Access::Hidden);
        assert_eq!(policy.access(Path::new("target"), true), Access::ReadWrite);
        assert_eq!(policy.access(Path::new("target/release"), true), Access::ReadWrite);
        assert!(policy.protects_below(Path::new("target")), "target/ cannot be renamed away");
        for share in [assets.clone(), assets.join("images")] {
            let e = boot_files_to_hide(&boot, &[(share.clone(), false)]).unwrap_err().to_string();
            assert!(e.contains(&format!("Refusing to share {} read-write", share.display())), "{e}");
            assert!(boot_files_to_hide(&boot, &[(share, true)]).unwrap()[0].is_empty(), "read-only is fine");
        }
        let elsewhere = dir(t.path(), "elsewhere");
        assert!(boot_files_to_hide(&boot, &[(elsewhere, false)]).unwrap()[0].is_empty());
        let deep = assets.join("x".repeat(250));
        let e = boot_files_to_hide(&[deep], &[(repo, false)]).unwrap_err().to_string();
        assert!(e.contains("too long"), "{e}");
    }
}

//! Host side: a sandbox's persistent state — a directory per sandbox under
//! the sbx home holding its settings, its console log and the result of its
//! last run. Written atomically (temp file + rename) so a crash never leaves
//! half a file. A running VMM holds an exclusive lock on `vmm.lock`: the
//! kernel drops it when the process dies, however it dies, so a stale pid
//! file (or a dead VMM not yet reaped) never reads as running.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("Bad sandbox name '{0}': use 1-64 letters, digits, '-', '_' or '.', not starting with '.'")]
    BadName(String),
    #[error("No sandbox named '{0}' (see `sbx ls`)")]
    NotFound(String),
    #[error("Sandbox '{0}' is running (pid {1}); stop it first with `sbx stop {0}`")]
    Running(String, i32),
    #[error("Cannot access sandbox state in {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("Sandbox state in {0} is corrupt: {1}")]
    Corrupt(PathBuf, String),
    #[error("Cannot format the sandbox disk {0}: {1}")]
    Format(PathBuf, String),
}

type Result<T> = std::result::Result<T, Error>;

/// The settings a sandbox keeps from one run to the next.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Settings {
    pub name: String,
    pub agent: String,
    pub workspace: PathBuf,
    pub created_unix: u64,
}

/// How the last run ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LastRun {
    pub ended_unix: u64,
    pub exit_code: i32,
    pub summary: String,
}

/// sbx's home: $SBX_HOME, else $XDG_DATA_HOME/sbx, else ~/.local/share/sbx.
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("SBX_HOME") {
        return PathBuf::from(h);
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(x).join("sbx");
    }
    let base = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join(".local/share/sbx")
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A default name from the agent and the workspace folder: `shell-myproj`.
pub fn default_name(agent: &str, workspace: &Path) -> String {
    let folder = workspace.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_else(|| "root".into());
    let mut name: String = format!("{agent}-{folder}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' })
        .collect();
    name.truncate(64);
    name
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let io = |e| Error::Io(path.to_path_buf(), e);
    let mut f = fs::File::create(&tmp).map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| Error::Corrupt(path.to_path_buf(), e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io(path.to_path_buf(), e)),
    }
}

/// A sandbox's settings (`Settings`, JSON) in its folder.
const SETTINGS_FILE: &str = "sandbox.json";

/// A sandbox's settings, if it has any; read back from disk, so checked:
/// a file naming another sandbox than its folder is corrupt. (The
/// workspace it names is checked by `folders::check_stored` before use.)
fn read_settings(path: &Path, name: &str) -> Result<Option<Settings>> {
    let settings = read_json::<Settings>(path)?;
    if let Some(s) = settings.as_ref().filter(|s| s.name != name) {
        let why = format!("it names sandbox '{}', not '{name}' (its folder)", crate::escape::line(&s.name));
        return Err(Error::Corrupt(path.to_path_buf(), why));
    }
    Ok(settings)
}

const LOCK_FILE: &str = "vmm.lock";
const DISK_FILE: &str = "disk.img";

fn find_mkfs() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join("mkfs.ext4"))
        .find(|p| p.is_file())
}
const PID_FILE: &str = "vmm.pid";

/// Held by the VMM process while it runs the sandbox.
pub struct RunningGuard {
    _lock: fs::File,
}

pub struct Sandbox {
    pub dir: PathBuf,
    pub settings: Settings,
}

impl Sandbox {
    fn dir_for(home: &Path, name: &str) -> Result<PathBuf> {
        if !valid_name(name) {
            return Err(Error::BadName(name.to_string()));
        }
        Ok(home.join("sandboxes").join(name))
    }

    /// Opens the sandbox `name`, creating it with `settings` if it is new.
    pub fn open_or_create(home: &Path, settings: Settings) -> Result<Sandbox> {
        let dir = Sandbox::dir_for(home, &settings.name)?;
        fs::create_dir_all(&dir).map_err(|e| Error::Io(dir.clone(), e))?;
        // Private: it holds the disk, the logs and the control socket.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(|e| Error::Io(dir.clone(), e))?;
        let path = dir.join(SETTINGS_FILE);
        let settings = match read_settings(&path, &settings.name)? {
            Some(existing) => existing,
            None => {
                let json =
                    serde_json::to_vec_pretty(&settings).map_err(|e| Error::Corrupt(path.clone(), e.to_string()))?;
                write_atomic(&path, &json)?;
                settings
            }
        };
        Ok(Sandbox { dir, settings })
    }

    pub fn open(home: &Path, name: &str) -> Result<Sandbox> {
        let dir = Sandbox::dir_for(home, name)?;
        let settings =
            read_settings(&dir.join(SETTINGS_FILE), name)?.ok_or_else(|| Error::NotFound(name.to_string()))?;
        Ok(Sandbox { dir, settings })
    }

    pub fn list(home: &Path) -> Result<Vec<Sandbox>> {
        let root = home.join("sandboxes");
        let entries = match fs::read_dir(&root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::Io(root, e)),
        };
        let mut out: Vec<Sandbox> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| Sandbox::open(home, &e.file_name().to_string_lossy()).ok())
            .collect();
        out.sort_by(|a, b| a.settings.name.cmp(&b.settings.name));
        Ok(out)
    }

    /// The sandbox's settings file (its workspace, checked before use).
    pub fn settings_file(&self) -> PathBuf {
        self.dir.join(SETTINGS_FILE)
    }

    /// The last run's kernel console, its older part in `console.log.1`
    /// (see `devices::console::ConsoleFile`).
    /// The sandbox's own directory (its state, logs and git shadow).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// Where a running VMM listens for `sbx exec` (a Unix socket, in the
    /// sandbox's own directory).
    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// Listens on the control socket. Call while holding the running
    /// guard: any socket file already there is a dead VMM's.
    pub fn listen_control(&self) -> Result<std::os::unix::net::UnixListener> {
        let path = self.control_socket();
        let _ = fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).map_err(|e| Error::Io(path.clone(), e))?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(|e| Error::Io(path.clone(), e))?;
        Ok(listener)
    }

    /// Where the git directories the guest makes in its shared folders are
    /// kept (see `fs::share::Share::with_git_shadow`); gone with `sbx rm`.
    pub fn git_shadow(&self) -> PathBuf {
        self.dir.join("gitdirs")
    }

    /// The audit log: network and file decisions, hash-chained JSON lines
    /// kept across runs, rotated into `audit.log.1`, `.2`, …; its refusals
    /// also kept, never rotated, in `audit-evidence.log` (see the `audit`
    /// crate).
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("audit.log")
    }

    /// Requests served by each shared folder's file server so far (JSON,
    /// rewritten while the sandbox runs; for figures).
    /// netstack's connection counters while it runs (and the last ones
    /// after): open, held, refused for limits, timed out.
    pub fn net_stats(&self) -> PathBuf {
        self.dir.join("net-stats.json")
    }

    pub fn fs_stats(&self) -> PathBuf {
        self.dir.join("fs-stats.json")
    }

    /// The sandbox's own writable disk (ext4, sparse): what the guest
    /// changes outside the workspace lives here, until `sbx rm`. Made on
    /// first use with `size_gib` of room; formatted under a temporary name
    /// and renamed, so a crash never leaves half a disk behind.
    pub fn data_disk(&self, size_gib: u64) -> Result<PathBuf> {
        let path = self.dir.join(DISK_FILE);
        if path.exists() {
            return Ok(path);
        }
        let tmp = self.dir.join("disk.img.tmp");
        let fail = |why: String| Error::Format(path.clone(), why);
        let f = fs::File::create(&tmp).map_err(|e| Error::Io(tmp.clone(), e))?;
        f.set_len(size_gib << 30).map_err(|e| Error::Io(tmp.clone(), e))?;
        drop(f);
        let mkfs = find_mkfs().ok_or_else(|| fail("mkfs.ext4 not found (install e2fsprogs)".into()))?;
        // Lazy init on a sparse file: mke2fs punches holes and marks every
        // inode table zeroed, so neither it nor the guest kernel writes
        // them. A small journal: crash safety without 128 MiB of it.
        let out = std::process::Command::new(mkfs)
            .args(["-q", "-F", "-L", "sbx-data", "-m", "0", "-J", "size=32"])
            .args(["-E", "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0"])
            .arg(&tmp)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| fail(e.to_string()))?;
        if !out.status.success() {
            let _ = fs::remove_file(&tmp);
            return Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_string()));
        }
        fs::rename(&tmp, &path).map_err(|e| Error::Io(path.clone(), e))?;
        Ok(path)
    }

    /// The pid of the VMM running this sandbox, if one is alive.
    pub fn running_pid(&self) -> Option<i32> {
        running_pid_in(&self.dir)
    }

    /// Marks the sandbox as run by this process until the returned guard
    /// is dropped or the process ends.
    pub fn mark_running(&self) -> Result<RunningGuard> {
        let path = self.dir.join(LOCK_FILE);
        let io = |e| Error::Io(path.clone(), e);
        let lock = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(Error::Running(self.settings.name.clone(), self.running_pid().unwrap_or(0)))
            }
            Err(fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        write_atomic(&self.dir.join(PID_FILE), std::process::id().to_string().as_bytes())?;
        Ok(RunningGuard { _lock: lock })
    }

    /// Records how the run ended. Call while still holding the guard, so
    /// that nobody sees the sandbox stopped before its result is written.
    pub fn mark_stopped(&self, last: &LastRun) -> Result<()> {
        let json = serde_json::to_vec_pretty(last).map_err(|e| Error::Corrupt(self.dir.clone(), e.to_string()))?;
        write_atomic(&self.dir.join("last-run.json"), &json)?;
        let _ = fs::remove_file(self.dir.join(PID_FILE));
        let _ = fs::remove_file(self.control_socket());
        Ok(())
    }

    pub fn last_run(&self) -> Result<Option<LastRun>> {
        read_json(&self.dir.join("last-run.json"))
    }

    pub fn remove(self) -> Result<()> {
        if let Some(pid) = self.running_pid() {
            return Err(Error::Running(self.settings.name.clone(), pid));
        }
        fs::remove_dir_all(&self.dir).map_err(|e| Error::Io(self.dir.clone(), e))
    }
}

/// The pid of the VMM running the sandbox whose folder is `dir`, if one
/// is alive (0: starting, its pid not yet written).
pub fn running_pid_in(dir: &Path) -> Option<i32> {
    let lock = fs::File::open(dir.join(LOCK_FILE)).ok()?;
    match lock.try_lock_shared() {
        // Nobody holds the lock: nothing runs (the shared lock is
        // dropped with `lock`).
        Ok(()) => None,
        Err(fs::TryLockError::WouldBlock) => {
            // Locked but the pid not yet written: report it as running
            // anyway, with pid 0 meaning "starting".
            Some(fs::read_to_string(dir.join(PID_FILE)).ok()?.trim().parse().unwrap_or(0))
        }
        Err(fs::TryLockError::Error(_)) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(name: &str) -> Settings {
        Settings { name: name.into(), agent: "shell".into(), workspace: "/w".into(), created_unix: 1 }
    }

    #[test]
    fn names_are_checked() {
        for ok in ["shell-proj", "a", "x.y_z-1"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "../x", "a/b", "a b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert_eq!(default_name("shell", Path::new("/home/u/My Project!")), "shell-My-Project-");
        assert!(valid_name(&default_name("shell", Path::new("/"))));
    }

    #[test]
    fn lifecycle_create_list_run_remove() {
        let home = tempfile::tempdir().unwrap();
        let sb = Sandbox::open_or_create(home.path(), settings("one")).unwrap();
        // A second open keeps the first settings.
        let mut other = settings("one");
        other.agent = "claude".into();
        assert_eq!(Sandbox::open_or_create(home.path(), other).unwrap().settings.agent, "shell");
        let guard = sb.mark_running().unwrap();
        assert_eq!(sb.running_pid(), Some(std::process::id() as i32));
        assert!(matches!(sb.mark_running(), Err(Error::Running(..))), "one VMM per sandbox");
        assert!(matches!(Sandbox::open(home.path(), "one").unwrap().remove(), Err(Error::Running(..))));
        let last = LastRun { ended_unix: 2, exit_code: 7, summary: "exit 7".into() };
        sb.mark_stopped(&last).unwrap();
        drop(guard);
        assert_eq!(sb.running_pid(), None);
        assert_eq!(sb.last_run().unwrap(), Some(last));
        assert_eq!(Sandbox::list(home.path()).unwrap().len(), 1);
        Sandbox::open(home.path(), "one").unwrap().remove().unwrap();
        assert!(matches!(Sandbox::open(home.path(), "one"), Err(Error::NotFound(_))));
        assert!(matches!(Sandbox::open(home.path(), "../etc"), Err(Error::BadName(_))));
    }

    #[test]
    fn a_stale_pid_file_is_not_a_running_sandbox() {
        // A VMM that died without cleaning up (or is a zombie not yet
        // reaped) leaves vmm.pid naming a process that may still exist.
        let home = tempfile::tempdir().unwrap();
        let sb = Sandbox::open_or_create(home.path(), settings("stale")).unwrap();
        fs::write(sb.dir.join(PID_FILE), std::process::id().to_string()).unwrap();
        assert_eq!(sb.running_pid(), None);
        fs::write(sb.dir.join(LOCK_FILE), b"").unwrap();
        assert_eq!(sb.running_pid(), None);
        let _guard = sb.mark_running().unwrap();
        assert!(sb.running_pid().is_some());
    }

    #[test]
    fn the_data_disk_is_made_once_sparse_and_kept() {
        let home = tempfile::tempdir().unwrap();
        let sb = Sandbox::open_or_create(home.path(), settings("disk")).unwrap();
        if find_mkfs().is_none() {
            eprintln!("SKIPPED: mkfs.ext4 not installed (e2fsprogs)");
            return;
        }
        let disk = sb.data_disk(4).unwrap();
        let meta = fs::metadata(&disk).unwrap();
        assert_eq!(meta.len(), 4 << 30);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 64 << 20, "sparse: {} bytes used", meta.blocks() * 512);
        let magic = {
            let mut b = [0u8; 2];
            use std::os::unix::fs::FileExt;
            fs::File::open(&disk).unwrap().read_exact_at(&mut b, 1024 + 0x38).unwrap();
            u16::from_le_bytes(b)
        };
        assert_eq!(magic, 0xef53, "an ext4 superblock");
        fs::write(sb.dir.join("marker"), b"x").unwrap();
        assert_eq!(sb.data_disk(4).unwrap(), disk, "made once");
        assert!(!sb.dir.join("disk.img.tmp").exists());
    }

    #[test]
    fn corrupt_state_is_reported_not_ignored() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("sandboxes/bad");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("sandbox.json"), b"{not json").unwrap();
        assert!(matches!(Sandbox::open(home.path(), "bad"), Err(Error::Corrupt(..))));
    }

    #[test]
    fn garbled_or_tampered_settings_are_errors_naming_the_file() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("sandboxes/t");
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join(SETTINGS_FILE);
        let garbled: [&[u8]; 8] = [
            b"",
            b"null",
            b"[]",
            b"\xff\xfe\x00junk",
            br#"{"name":"t","agent":"shell","workspace":7,"created_unix":1}"#,
            br#"{"name":"t","agent":"shell","created_unix":1}"#,
            br#"{"name":"t","agent":"shell","workspace":"/w","created_unix":-1}"#,
            br#"{"name":"other","agent":"shell","workspace":"/w","created_unix":1}"#,
        ];
        for text in garbled {
            fs::write(&file, text).unwrap();
            for result in [Sandbox::open(home.path(), "t"), Sandbox::open_or_create(home.path(), settings("t"))] {
                let Err(e @ Error::Corrupt(..)) = result else {
                    panic!("{:?}: not corrupt", String::from_utf8_lossy(text))
                };
                assert!(e.to_string().contains(&file.display().to_string()), "{e}");
            }
        }
        fs::write(&file, br#"{"name":"\u001b]0;x\u0007","agent":"shell","workspace":"/w","created_unix":1}"#).unwrap();
        let e = Sandbox::open(home.path(), "t").err().unwrap().to_string();
        assert!(e.contains("names sandbox '\\x1b]0;x\\x07', not 't'"), "{e}");
        // Unknown fields are ignored (a newer sbx's), the file kept.
        fs::write(&file, br#"{"name":"t","agent":"shell","workspace":"/w","created_unix":1,"new":true}"#).unwrap();
        assert_eq!(Sandbox::open(home.path(), "t").unwrap().settings, settings("t"));
        assert!(Sandbox::list(home.path()).unwrap().len() == 1);
    }
}

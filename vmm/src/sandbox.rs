//! Host side: a sandbox's persistent state — a directory per sandbox under
//! the sbx home holding its settings, its console log and the result of its
//! last run. Written atomically (temp file + rename) so a crash never leaves
//! half a file.

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
        let path = dir.join("sandbox.json");
        let settings = match read_json::<Settings>(&path)? {
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
            read_json::<Settings>(&dir.join("sandbox.json"))?.ok_or_else(|| Error::NotFound(name.to_string()))?;
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

    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// The pid of the VMM running this sandbox, if one is alive.
    pub fn running_pid(&self) -> Option<i32> {
        let pid: i32 = fs::read_to_string(self.dir.join("vmm.pid")).ok()?.trim().parse().ok()?;
        std::path::Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    pub fn mark_running(&self) -> Result<()> {
        if let Some(pid) = self.running_pid() {
            return Err(Error::Running(self.settings.name.clone(), pid));
        }
        write_atomic(&self.dir.join("vmm.pid"), std::process::id().to_string().as_bytes())
    }

    pub fn mark_stopped(&self, last: &LastRun) -> Result<()> {
        let json = serde_json::to_vec_pretty(last).map_err(|e| Error::Corrupt(self.dir.clone(), e.to_string()))?;
        write_atomic(&self.dir.join("last-run.json"), &json)?;
        let _ = fs::remove_file(self.dir.join("vmm.pid"));
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
        sb.mark_running().unwrap();
        assert_eq!(sb.running_pid(), Some(std::process::id() as i32));
        assert!(matches!(Sandbox::open(home.path(), "one").unwrap().remove(), Err(Error::Running(..))));
        let last = LastRun { ended_unix: 2, exit_code: 7, summary: "exit 7".into() };
        sb.mark_stopped(&last).unwrap();
        assert_eq!(sb.running_pid(), None);
        assert_eq!(sb.last_run().unwrap(), Some(last));
        assert_eq!(Sandbox::list(home.path()).unwrap().len(), 1);
        Sandbox::open(home.path(), "one").unwrap().remove().unwrap();
        assert!(matches!(Sandbox::open(home.path(), "one"), Err(Error::NotFound(_))));
        assert!(matches!(Sandbox::open(home.path(), "../etc"), Err(Error::BadName(_))));
    }

    #[test]
    fn corrupt_state_is_reported_not_ignored() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("sandboxes/bad");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("sandbox.json"), b"{not json").unwrap();
        assert!(matches!(Sandbox::open(home.path(), "bad"), Err(Error::Corrupt(..))));
    }
}

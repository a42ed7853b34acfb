//! Guest side: assembles the guest's root filesystem from the sandbox's
//! disks and makes it the root, PID 1 staying what it is. The image's base
//! (shared by every sandbox, read-only) lies under the sandbox's own
//! writable disk with overlayfs, so what the agent installs or changes
//! outside the workspace persists with the sandbox and nothing else.
//! Disks are found by their serial number (virtio-blk GET_ID, set by the
//! VMM), not by their order, so no VMM's device order can swap them.

use std::fs;
use std::os::fd::OwnedFd;

use protocol::{BASE_DISK_SERIAL, DATA_DISK_SERIAL};

use crate::sys;

const BASE: &str = "/sbx/base";
const DATA: &str = "/sbx/data";
const NEWROOT: &str = "/sbx/root";

/// The /dev node of the virtio disk whose serial is `serial`.
fn find_disk(serial: &str) -> Result<String, String> {
    let entries = fs::read_dir("/sys/block").map_err(|e| format!("Cannot list /sys/block: {e}"))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("vd") {
            continue;
        }
        let found = fs::read(entry.path().join("serial")).unwrap_or_default();
        let found = String::from_utf8_lossy(&found);
        if found.trim_end_matches(['\0', '\n', ' ']) == serial {
            return Ok(format!("/dev/{name}"));
        }
    }
    Err(format!("No disk with serial '{serial}' (the VMM attaches it)"))
}

fn mkdir(path: &str) -> Result<(), String> {
    fs::create_dir_all(path).map_err(|e| format!("Cannot create {path}: {e}"))
}

/// The sandbox's writable disk, held open from outside the new root so
/// that it can be left clean at power-off.
pub struct DataDisk(OwnedFd);

impl DataDisk {
    /// Writes out everything and leaves the disk clean (ext4: journal
    /// flushed, no recovery needed at the next mount). The filesystem stays
    /// frozen: call only on the way to power-off.
    pub fn close_for_power_off(&self) -> std::io::Result<()> {
        sys::sync();
        sys::freeze(&self.0)
    }
}

/// Mounts base and data disks, overlays them on /sbx/root, moves the
/// already mounted /dev, /proc and /sys there and makes it the root.
pub fn switch_to_disks() -> Result<DataDisk, String> {
    let base = find_disk(BASE_DISK_SERIAL)?;
    let data = find_disk(DATA_DISK_SERIAL)?;
    for dir in [BASE, DATA, NEWROOT] {
        mkdir(dir)?;
    }
    sys::mount(&base, BASE, "ext4", libc::MS_RDONLY).map_err(|e| format!("Cannot mount {base} on {BASE}: {e}"))?;
    sys::mount(&data, DATA, "ext4", libc::MS_NOATIME).map_err(|e| format!("Cannot mount {data} on {DATA}: {e}"))?;
    let disk = DataDisk(fs::File::open(DATA).map_err(|e| format!("Cannot open {DATA}: {e}"))?.into());
    let upper = format!("{DATA}/upper");
    let work = format!("{DATA}/work");
    mkdir(&upper)?;
    mkdir(&work)?;
    let options = format!("lowerdir={BASE},upperdir={upper},workdir={work}");
    sys::mount_with_data("overlay", NEWROOT, "overlay", libc::MS_NOATIME, Some(&options))
        .map_err(|e| format!("Cannot mount the overlay root ({options}): {e}"))?;
    for m in ["/dev", "/proc", "/sys"] {
        let to = format!("{NEWROOT}{m}");
        mkdir(&to)?;
        sys::move_mount(m, &to).map_err(|e| format!("Cannot move {m} to {to}: {e}"))?;
    }
    // As switch_root does: the new root takes the place of the initramfs.
    std::env::set_current_dir(NEWROOT).map_err(|e| format!("Cannot enter {NEWROOT}: {e}"))?;
    sys::move_mount(".", "/").map_err(|e| format!("Cannot move {NEWROOT} to /: {e}"))?;
    sys::chroot(".").map_err(|e| format!("Cannot chroot into the new root: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("Cannot enter the new root: {e}"))?;
    Ok(disk)
}

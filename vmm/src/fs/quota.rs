//! Host side: the workspace write quota (`sbx run --workspace-quota`) —
//! how much the guest may add to the host's disk through the shared
//! folders (and the git shadow beside them) during a run, one count for
//! all their file servers.
//!
//! What is counted, in bytes:
//!
//! - the growth of files' sizes the guest causes: a write past the end of
//!   a file (so a new file's data), a truncate upward, in the folder or in
//!   the git shadow (guest-made `.git` directories, rebase and sequencer
//!   state, kept in the sandbox's state directory) alike;
//! - every object the guest makes, [`OBJECT_COST`] each (one block and an
//!   inode of the host's filesystem): a file, a directory, a symbolic link
//!   (and its target's bytes), and the shadow container a guest-made git
//!   directory is kept in (never given back: containers are kept across
//!   runs). So a quota of Q bytes lets the guest make at most
//!   Q / [`OBJECT_COST`] objects ([`Quota::max_objects`]), empty or not.
//!
//! Fallocate, copy_file_range and extended attributes are not offered
//! (ENOSYS); hard links are never made. A request that would take the
//! count past the limit is refused whole with EDQUOT ("Disk quota
//! exceeded") and changes nothing.
//!
//! Shrinking a file gives its bytes back; removing an object gives back
//! its cost (a file's with its bytes, but only at its last link), whether
//! by unlink, rmdir or a rename over it. A file removed while the guest
//! still holds it open stays on the host's disk, and stays counted (its
//! writes too) until the last of its handles is closed (RELEASE). Bytes
//! come back down to zero: removing what was there before the run makes
//! no room beyond the quota. Sizes are apparent sizes, so a sparse file
//! counts as large as it reads; writing into holes of a file that was
//! sparse before the run is not counted.
//!
//! Refusals come in bursts (a program writing a large file gets every one
//! of its writes refused): the first refusal of a burst is audited, the
//! others are counted in it; the burst ends when the guest grows a file
//! again or gives bytes back.

use std::sync::Mutex;

/// What one object the guest makes (file, directory, symbolic link, shadow
/// container) costs besides its bytes: a block of a usual host filesystem
/// (ext4, xfs, btrfs all give a directory at least one), standing for its
/// inode and its directory entry too.
pub const OBJECT_COST: u64 = 4096;

/// The quota shared by the file servers of one sandbox.
#[derive(Debug)]
pub struct Quota {
    limit: u64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    used: u64,
    /// Refusals since the burst began (0: none going on).
    refusing: u64,
}

/// A growth refused: the figures for the guest's audit line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The first of its burst: the one to audit.
    pub first: bool,
    pub limit: u64,
    pub used: u64,
    pub asked: u64,
}

impl Refusal {
    /// The reason, for the audit line.
    pub fn reason(&self) -> String {
        format!(
            "Workspace quota (--workspace-quota) of {} bytes: {} used, {} more asked",
            self.limit, self.used, self.asked
        )
    }
}

impl Quota {
    pub fn new(limit: u64) -> Quota {
        Quota { limit, state: Mutex::new(State::default()) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Most objects the guest may make (if it adds no bytes): the quota
    /// bounds inodes as it bounds bytes.
    pub fn max_objects(&self) -> u64 {
        self.limit / OBJECT_COST
    }

    /// Bytes added so far (net of those given back).
    pub fn used(&self) -> u64 {
        self.state().used
    }

    /// Bytes that may still be added.
    pub fn remaining(&self) -> u64 {
        self.limit.saturating_sub(self.used())
    }

    /// Takes `bytes` of growth, or refuses it (taking nothing) when the
    /// count would pass the limit.
    pub fn take(&self, bytes: u64) -> Result<(), Refusal> {
        if bytes == 0 {
            return Ok(());
        }
        let mut s = self.state();
        match s.used.checked_add(bytes).filter(|u| *u <= self.limit) {
            Some(used) => {
                s.used = used;
                s.refusing = 0;
                Ok(())
            }
            None => {
                s.refusing = s.refusing.saturating_add(1);
                Err(Refusal { first: s.refusing == 1, limit: self.limit, used: s.used, asked: bytes })
            }
        }
    }

    /// Gives `bytes` back (a file shrank or went, or a write taken did
    /// not happen), down to zero.
    pub fn give_back(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let mut s = self.state();
        s.used = s.used.saturating_sub(bytes);
        s.refusing = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_is_taken_up_to_the_limit_and_refused_past_it_in_bursts() {
        let q = Quota::new(100);
        assert_eq!(q.take(60), Ok(()));
        assert_eq!(q.take(40), Ok(()));
        assert_eq!(q.remaining(), 0);
        let r = q.take(1).unwrap_err();
        assert_eq!(r, Refusal { first: true, limit: 100, used: 100, asked: 1 });
        assert!(r.reason().contains("of 100 bytes: 100 used, 1 more asked"), "{}", r.reason());
        assert!(!q.take(5).unwrap_err().first, "the same burst");
        assert_eq!(q.take(0), Ok(()), "no growth, no refusal");
        assert!(!q.take(u64::MAX).unwrap_err().first, "no overflow");
        q.give_back(30);
        assert_eq!(q.used(), 70);
        assert!(q.take(31).unwrap_err().first, "a new burst");
        assert_eq!(q.take(30), Ok(()));
        q.give_back(1000);
        assert_eq!(q.used(), 0, "down to zero, no credit");
    }
}

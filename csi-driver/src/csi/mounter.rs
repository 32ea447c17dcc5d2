//! The mount operations of the CSI node plugin, behind a trait: the Linux one does the
//! real `mount(2)`s, the fake keeps a table in memory so node logic is tested without
//! privileges (the real one is tested as root, with real mounts).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use crate::fuse::MountOptions;

pub trait Mounter: Send + Sync + 'static {
    /// Mounts a new FUSE connection at `target`; returns its /dev/fuse descriptor.
    fn mount_fuse(&self, target: &Path, opts: &MountOptions) -> io::Result<OwnedFd>;
    /// Bind-mounts `source` at `target`, read-only if asked.
    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> io::Result<()>;
    /// Unmounts `target`; not mounted is Ok; a busy mount is detached.
    fn unmount(&self, target: &Path) -> io::Result<()>;
    fn is_mounted(&self, target: &Path) -> io::Result<bool>;
    /// Whether the mount at `target` answers (a FUSE mount whose connection is gone
    /// fails every access with `ENOTCONN`).
    fn answers(&self, target: &Path) -> bool;
}

/// A path as the mount table shows it: made absolute through its parent, which is
/// never the mount itself (canonicalizing a dead FUSE mount fails).
fn table_path(p: &Path) -> PathBuf {
    match (p.parent(), p.file_name()) {
        (Some(parent), Some(name)) => parent
            .canonicalize()
            .map(|d| d.join(name))
            .unwrap_or_else(|_| p.to_owned()),
        _ => p.to_owned(),
    }
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// How long [`LinuxMounter::answers`] waits for a statfs.
pub const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Paths whose statfs is under way (see [`LinuxMounter::answers`]).
static ASKING: parking_lot::Mutex<std::collections::BTreeSet<PathBuf>> =
    parking_lot::Mutex::new(std::collections::BTreeSet::new());

/// The real thing.
pub struct LinuxMounter;

impl Mounter for LinuxMounter {
    fn mount_fuse(&self, target: &Path, opts: &MountOptions) -> io::Result<OwnedFd> {
        crate::fuse::mount(target, opts)
    }

    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> io::Result<()> {
        let (s, t) = (cstr(source)?, cstr(target)?);
        // SAFETY: NUL-terminated paths that outlive the call; no data argument.
        if unsafe {
            libc::mount(
                s.as_ptr(),
                t.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        } != 0
        {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "bind-mounting {} at {}: {e}",
                    source.display(),
                    target.display()
                ),
            ));
        }
        if read_only {
            let flags = libc::MS_BIND
                | libc::MS_REMOUNT
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV;
            // SAFETY: as above; a remount of the bind just made, read-only.
            if unsafe {
                libc::mount(
                    std::ptr::null(),
                    t.as_ptr(),
                    std::ptr::null(),
                    flags,
                    std::ptr::null(),
                )
            } != 0
            {
                let e = io::Error::last_os_error();
                let _ = self.unmount(target);
                return Err(io::Error::new(
                    e.kind(),
                    format!("making {} read-only: {e}", target.display()),
                ));
            }
        }
        Ok(())
    }

    fn unmount(&self, target: &Path) -> io::Result<()> {
        let path = table_path(target);
        if !self.is_mounted(&path)? {
            return Ok(());
        }
        let t = cstr(&path)?;
        // SAFETY: a NUL-terminated path that outlives the call.
        if unsafe { libc::umount2(t.as_ptr(), 0) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EBUSY) {
            // Something still holds it (a process with a file open): detach, so it
            // leaves the mount table now and goes when the last user lets go.
            // SAFETY: as above.
            if unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) } == 0 {
                return Ok(());
            }
        }
        let e = io::Error::last_os_error();
        if !self.is_mounted(&path)? {
            return Ok(());
        }
        Err(io::Error::new(
            e.kind(),
            format!("unmounting {}: {e}", path.display()),
        ))
    }

    fn is_mounted(&self, target: &Path) -> io::Result<bool> {
        crate::mounts::is_mounted(&table_path(target))
    }

    fn answers(&self, target: &Path) -> bool {
        // statfs, not stat: FUSE sends every statfs to the server, while a stat of the
        // root may be answered from the kernel's attribute cache long after the
        // connection died. A connection that ended fails at once (ENOTCONN); one that a
        // process still holds but nobody serves (the keeper's, while no agent runs)
        // blocks until someone does. So the statfs runs on a thread of its own, one at a
        // time per path, and one that has not returned within ANSWER_WITHIN means the
        // connection is held: alive, not to be mounted anew. The caller never blocks.
        let Ok(path) = cstr(target) else {
            return false;
        };
        let key = target.to_owned();
        if !ASKING.lock().insert(key.clone()) {
            return true; // the statfs asked before still waits: held, unserved
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("statfs".into())
            .spawn(move || {
                let mut buf = std::mem::MaybeUninit::<libc::statfs>::uninit();
                // SAFETY: a NUL-terminated path and a buffer of the right type.
                let ok = unsafe { libc::statfs(path.as_ptr(), buf.as_mut_ptr()) == 0 };
                ASKING.lock().remove(&key);
                let _ = tx.send(ok);
            });
        if spawned.is_err() {
            ASKING.lock().remove(target);
            return true; // cannot tell: never remount on a guess
        }
        rx.recv_timeout(ANSWER_WITHIN).unwrap_or(true)
    }
}

/// What the fake has mounted where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FakeMount {
    Fuse,
    Bind { source: PathBuf, read_only: bool },
}

/// An in-memory mount table (no privileges, no kernel).
#[derive(Default)]
pub struct FakeMounter {
    pub table: Mutex<BTreeMap<PathBuf, FakeMount>>,
    /// Paths whose mount stops answering (a dead connection).
    pub dead: Mutex<Vec<PathBuf>>,
    /// The far end of each fake connection's descriptor (a pipe): dropped when the
    /// connection dies, so the descriptor reports `POLLERR` as /dev/fuse does.
    peers: Mutex<BTreeMap<PathBuf, OwnedFd>>,
}

impl FakeMounter {
    /// The connection mounted at `target` dies (its server and every holder gone).
    pub fn kill(&self, target: &Path) {
        self.dead.lock().push(target.to_owned());
        self.peers.lock().remove(target);
    }
}

impl Mounter for FakeMounter {
    fn mount_fuse(&self, target: &Path, _opts: &MountOptions) -> io::Result<OwnedFd> {
        let mut t = self.table.lock();
        if t.contains_key(target) {
            return Err(io::Error::other(format!(
                "{} is already mounted",
                target.display()
            )));
        }
        t.insert(target.to_owned(), FakeMount::Fuse);
        let mut ends = [0; 2];
        // SAFETY: a two-element array for pipe2 to fill.
        if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned here.
        let (read, write) =
            unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
        self.peers.lock().insert(target.to_owned(), read);
        Ok(write)
    }

    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> io::Result<()> {
        self.table.lock().insert(
            target.to_owned(),
            FakeMount::Bind {
                source: source.to_owned(),
                read_only,
            },
        );
        Ok(())
    }

    fn unmount(&self, target: &Path) -> io::Result<()> {
        self.table.lock().remove(target);
        self.dead.lock().retain(|p| p != target);
        self.peers.lock().remove(target);
        Ok(())
    }

    fn is_mounted(&self, target: &Path) -> io::Result<bool> {
        Ok(self.table.lock().contains_key(target))
    }

    fn answers(&self, target: &Path) -> bool {
        self.table.lock().contains_key(target) && !self.dead.lock().iter().any(|p| p == target)
    }
}

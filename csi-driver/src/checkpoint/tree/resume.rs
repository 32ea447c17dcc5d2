//! What a checkpoint tree remembers so that a restarted server can take over a live
//! kernel connection (the node agent restarts while pods keep their volumes mounted).
//!
//! The kernel keeps using the node ids and file handles we gave it; a new process has
//! to answer for them. So every node id is recorded with the backing file's *file
//! handle* (`name_to_handle_at`: stable across renames, resolved again with
//! `open_by_handle_at`), and every open with its node, flags and passthrough backing id.
//!
//! The record is an append-only text log (`N`ode, `F`orget, `O`pen, `D`ir open,
//! `C`lose, and `X`, the next free ids), one `write(2)` per record, written before the reply that hands the id to
//! the kernel. No fsync: the log only has to outlive our process, not the machine (a
//! reboot ends the kernel connection too). A torn last line is skipped. On take-over the
//! log is replayed, every live node reopened, and the log rewritten to the live set; it
//! is compacted the same way when it grows past a multiple of the live set.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

/// Largest file handle Linux hands out (`MAX_HANDLE_SZ`).
const MAX_HANDLE: usize = 128;

/// `struct file_handle` with room for the largest handle.
#[repr(C)]
struct RawHandle {
    bytes: u32,
    kind: i32,
    data: [u8; MAX_HANDLE],
}

/// A backing file's handle: its type and bytes, as the file system encodes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileHandle {
    pub kind: i32,
    pub data: Vec<u8>,
}

impl FileHandle {
    /// The handle of the file `fd` refers to (an `O_PATH` descriptor is enough).
    pub fn of(fd: RawFd) -> io::Result<FileHandle> {
        let mut h = RawHandle {
            bytes: MAX_HANDLE as u32,
            kind: 0,
            data: [0; MAX_HANDLE],
        };
        let mut mount_id: libc::c_int = 0;
        // SAFETY: fd is live, the path is an empty C string (AT_EMPTY_PATH names fd
        // itself), h has room for MAX_HANDLE bytes as its header says.
        let rc = unsafe {
            libc::name_to_handle_at(
                fd,
                c"".as_ptr(),
                (&mut h as *mut RawHandle).cast(),
                &mut mount_id,
                libc::AT_EMPTY_PATH,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(FileHandle {
            kind: h.kind,
            data: h.data[..h.bytes as usize].to_vec(),
        })
    }

    /// Opens the file again (`O_PATH`), through any descriptor `mount_fd` on its file
    /// system (not itself `O_PATH`: the kernel refuses those with `EBADF`). Needs
    /// `CAP_DAC_READ_SEARCH`; a file removed since is `ESTALE`.
    pub fn open(&self, mount_fd: RawFd) -> io::Result<OwnedFd> {
        if self.data.len() > MAX_HANDLE {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut h = RawHandle {
            bytes: self.data.len() as u32,
            kind: self.kind,
            data: [0; MAX_HANDLE],
        };
        h.data[..self.data.len()].copy_from_slice(&self.data);
        // SAFETY: mount_fd is live; h is a well-formed file_handle.
        let fd = unsafe {
            libc::open_by_handle_at(
                mount_fd,
                (&mut h as *mut RawHandle).cast(),
                libc::O_PATH | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor we own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// One open file as the kernel still holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedOpen {
    pub node: u64,
    /// The open(2) flags the kernel sent.
    pub flags: u32,
    /// The passthrough backing id the kernel uses for it (0: none).
    pub backing: u32,
}

/// The live state a log replays to.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Saved {
    pub nodes: HashMap<u64, FileHandle>,
    pub opens: HashMap<u64, SavedOpen>,
    /// Directory handles: fh → node.
    pub dirs: HashMap<u64, u64>,
    /// Larger than every node id and file handle ever given out.
    pub next_node: u64,
    pub next_fh: u64,
}

impl Saved {
    fn apply(&mut self, line: &str) -> Option<()> {
        let mut f = line.split(' ');
        let tag = f.next()?;
        let num = |s: Option<&str>| s?.parse::<u64>().ok();
        match tag {
            "N" => {
                let id = num(f.next())?;
                let kind = f.next()?.parse::<i32>().ok()?;
                let data = hex_decode(f.next()?)?;
                self.next_node = self.next_node.max(id + 1);
                self.nodes.insert(id, FileHandle { kind, data });
            }
            "F" => {
                self.nodes.remove(&num(f.next())?);
            }
            "O" => {
                let fh = num(f.next())?;
                let node = num(f.next())?;
                let flags = f.next()?.parse::<u32>().ok()?;
                let backing = f.next()?.parse::<u32>().ok()?;
                self.next_fh = self.next_fh.max(fh + 1);
                self.opens.insert(
                    fh,
                    SavedOpen {
                        node,
                        flags,
                        backing,
                    },
                );
            }
            "D" => {
                let fh = num(f.next())?;
                let node = num(f.next())?;
                self.next_fh = self.next_fh.max(fh + 1);
                self.dirs.insert(fh, node);
            }
            "X" => {
                self.next_node = self.next_node.max(num(f.next())?);
                self.next_fh = self.next_fh.max(num(f.next())?);
            }
            "C" => {
                let fh = num(f.next())?;
                self.opens.remove(&fh);
                self.dirs.remove(&fh);
            }
            _ => return None,
        }
        Some(())
    }

    /// Replays the log at `path` (missing: nothing saved). Unparsable lines (a torn
    /// last write) are skipped.
    pub fn load(path: &Path) -> io::Result<Saved> {
        let mut s = Saved {
            next_node: 2,
            next_fh: 1,
            ..Saved::default()
        };
        let f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(s),
            Err(e) => return Err(e),
        };
        for line in io::BufReader::new(f).split(b'\n') {
            let line = line?;
            let Ok(text) = std::str::from_utf8(&line) else {
                continue;
            };
            if s.apply(text).is_none() {
                tracing::debug!(record = text, "skipping a torn tree-state record");
            }
        }
        Ok(s)
    }
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The log of a tree being served.
pub struct StateLog {
    path: PathBuf,
    inner: Mutex<LogInner>,
}

struct LogInner {
    file: File,
    /// Live records (what a compaction keeps) and records written since the last one.
    live: Saved,
    written: u64,
}

/// Compact when the log holds this many times the live records (and at least
/// [`COMPACT_MIN`] records).
const COMPACT_FACTOR: u64 = 4;
const COMPACT_MIN: u64 = 65_536;

impl StateLog {
    /// Starts a log at `path` holding exactly `live` (written to a temporary file and
    /// renamed over the old log).
    pub fn create(path: &Path, live: Saved) -> io::Result<StateLog> {
        let file = write_snapshot(path, &live)?;
        let written = count(&live);
        Ok(StateLog {
            path: path.to_owned(),
            inner: Mutex::new(LogInner {
                file,
                live,
                written,
            }),
        })
    }

    fn append(&self, line: String, update: impl FnOnce(&mut Saved)) {
        let mut g = self.inner.lock();
        update(&mut g.live);
        if let Err(e) = g.file.write_all(line.as_bytes()) {
            tracing::warn!(error = %e, path = %self.path.display(), "cannot record tree state; a restarted agent may not take this volume over");
        }
        g.written += 1;
        let live = count(&g.live);
        if g.written > COMPACT_MIN.max(live * COMPACT_FACTOR) {
            match write_snapshot(&self.path, &g.live) {
                Ok(f) => {
                    g.file = f;
                    g.written = live;
                }
                Err(e) => {
                    tracing::warn!(error = %e, path = %self.path.display(), "cannot compact the tree state")
                }
            }
        }
    }

    /// The recorded handle of node `id`, if it is live in the record.
    pub fn handle_of(&self, id: u64) -> Option<FileHandle> {
        self.inner.lock().live.nodes.get(&id).cloned()
    }

    pub fn node(&self, id: u64, h: &FileHandle) {
        let line = format!(
            "N {id} {} {}\n",
            h.kind,
            crate::checkpoint::upload::hex(&h.data)
        );
        self.append(line, |s| {
            s.nodes.insert(id, h.clone());
        });
    }

    pub fn forget(&self, id: u64) {
        self.append(format!("F {id}\n"), |s| {
            s.nodes.remove(&id);
        });
    }

    pub fn open(&self, fh: u64, o: SavedOpen) {
        let line = format!("O {fh} {} {} {}\n", o.node, o.flags, o.backing);
        self.append(line, |s| {
            s.opens.insert(fh, o);
        });
    }

    pub fn opendir(&self, fh: u64, node: u64) {
        self.append(format!("D {fh} {node}\n"), |s| {
            s.dirs.insert(fh, node);
        });
    }

    pub fn close(&self, fh: u64) {
        self.append(format!("C {fh}\n"), |s| {
            s.opens.remove(&fh);
            s.dirs.remove(&fh);
        });
    }
}

fn count(s: &Saved) -> u64 {
    (s.nodes.len() + s.opens.len() + s.dirs.len()) as u64
}

/// Writes `live` as a fresh log (temporary file, renamed into place) and returns it
/// open for appending.
fn write_snapshot(path: &Path, live: &Saved) -> io::Result<File> {
    let tmp = path.with_extension("tmp");
    {
        let mut w = io::BufWriter::new(File::create(&tmp)?);
        // Ids are never given out twice, even those no longer live.
        writeln!(w, "X {} {}", live.next_node, live.next_fh)?;
        for (id, h) in &live.nodes {
            writeln!(
                w,
                "N {id} {} {}",
                h.kind,
                crate::checkpoint::upload::hex(&h.data)
            )?;
        }
        for (fh, o) in &live.opens {
            writeln!(w, "O {fh} {} {} {}", o.node, o.flags, o.backing)?;
        }
        for (fh, node) in &live.dirs {
            writeln!(w, "D {fh} {node}")?;
        }
        w.flush()?;
    }
    std::fs::rename(&tmp, path)?;
    OpenOptions::new().append(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_replayed_log_keeps_what_is_live_and_skips_a_torn_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let f = File::open(dir.path()).unwrap();
        let h = FileHandle::of(f.as_raw_fd()).unwrap();
        let log = StateLog::create(&path, Saved::default()).unwrap();
        log.node(7, &h);
        log.node(9, &h);
        log.forget(9);
        log.open(
            3,
            SavedOpen {
                node: 7,
                flags: libc::O_RDWR as u32,
                backing: 5,
            },
        );
        log.open(
            4,
            SavedOpen {
                node: 7,
                flags: 0,
                backing: 0,
            },
        );
        log.close(4);
        log.opendir(11, 7);
        drop(log);
        // A write cut short by a kill.
        let mut a = OpenOptions::new().append(true).open(&path).unwrap();
        a.write_all(b"O 12 7 2").unwrap();
        let s = Saved::load(&path).unwrap();
        assert_eq!(s.nodes.keys().copied().collect::<Vec<_>>(), vec![7]);
        assert_eq!(s.opens.len(), 1);
        assert_eq!(s.opens[&3].backing, 5);
        assert_eq!(s.dirs.get(&11), Some(&7));
        assert_eq!(s.next_node, 10, "ids are never given out twice");
        assert_eq!(s.next_fh, 12);
        // The handle names the same directory again.
        let back = s.nodes[&7].open(f.as_raw_fd()).unwrap();
        let st = |fd: RawFd| {
            // SAFETY: zeroed stat is a valid out-buffer.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: fd is live; st is a valid out-buffer.
            assert_eq!(unsafe { libc::fstat(fd, &mut st) }, 0);
            (st.st_dev, st.st_ino)
        };
        assert_eq!(st(back.as_raw_fd()), st(f.as_raw_fd()));
        // Compaction keeps exactly the live set.
        let log = StateLog::create(&path, s).unwrap();
        drop(log);
        let again = Saved::load(&path).unwrap();
        assert_eq!((again.next_node, again.next_fh), (10, 12));
        assert_eq!(again.nodes.len(), 1);
        assert_eq!(again.opens.len(), 1);
        assert_eq!(again.dirs.len(), 1);
    }
}

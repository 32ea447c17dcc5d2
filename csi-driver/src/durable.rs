//! Small files written so that a crash or a power loss leaves either the old content or
//! the new, never a torn or empty file, and directories only their owner may open. Used
//! by the checkpoint journal, the CSI plugin's records of staged volumes and the agent's
//! token files.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

/// Makes `dir`'s entries (a file created, renamed or removed in it) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` atomically (temp file, sync, rename, directory sync).
///
/// The temporary file is `.<name>.<pid>.<n>.tmp` beside `path`: unique to this call
/// (process id and a per-process counter), so writes of different files in one
/// directory (`seen/ckpt.1` and `seen/ckpt.2`), from any number of threads or
/// processes, never share one. Its leading dot keeps it out of every listing of the
/// journal (see [`Journal::seen`]); a crash can leave one behind, never a torn target.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_mode(path, bytes, 0o666)
}

/// [`write_atomic`] for a secret (a token, a key): the file is created 0600 (owner
/// only) from its first byte, never readable by others even for a moment.
pub fn write_atomic_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_mode(path, bytes, 0o600)
}

/// Creates `dir` (and its parents) if needed and makes it 0700: only its owner (root,
/// for the agent) may list or open what it holds, whatever it held before.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// [`write_atomic`] with the temporary file created with `mode` (less the umask).
fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.{n}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let written = (|| {
        // A leftover of a crashed process that had the same pid: created anew, so the
        // mode is this call's.
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

//! Test support shared by the integration tests, `make demo` and `make bench`.
//!
//! Library code rather than `#[cfg(test)]` because integration tests, examples and
//! benches link the library as an ordinary dependency. Nothing here is used by the
//! `tidepool` binary's data path.

pub mod azurite;
pub mod disk;
pub mod fault_proxy;
pub mod lake_check;
pub mod mount_process;
pub mod node;
pub mod synthetic;

pub use self::azurite::{Azurite, TlsFiles};
pub use self::mount_process::MountProcess;
pub use self::synthetic::SyntheticLake;

/// Polls `f` every 50 ms until it gives a value or `limit` has passed.
pub fn within<T>(limit: std::time::Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() > end {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Deterministic, position-dependent test content (xorshift64): a block served at the
/// wrong offset or from the wrong version changes the bytes, so equality checks catch it.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The fuse module's switch for FUSE over io_uring (Linux 6.14+).
const FUSE_ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Turns the fuse module's `enable_uring` on while it lives (as an administrator would)
/// and puts back what was there when dropped, so a mount can negotiate FUSE over
/// io_uring. `None`, with the reason printed, where the kernel has no such switch or we
/// may not change it: the caller skips, loudly.
pub struct FuseUring {
    previous: String,
}

impl FuseUring {
    pub fn enable() -> Option<FuseUring> {
        Self::enable_for("FUSE over io_uring")
    }

    /// [`FuseUring::enable`] for test `test`: a loud skip (a failure where
    /// `$TIDEPOOL_REQUIRE` names `uring`) where it cannot.
    pub fn enable_for(test: &str) -> Option<FuseUring> {
        use tidepool_api::skip::{Need, skip};
        let previous = match std::fs::read_to_string(FUSE_ENABLE_URING) {
            Ok(v) => v.trim().to_owned(),
            Err(e) => {
                skip(
                    Need::Uring,
                    test,
                    &format!("this kernel has no {FUSE_ENABLE_URING} ({e}; needs Linux 6.14+)"),
                );
                return None;
            }
        };
        if let Err(e) = std::fs::write(FUSE_ENABLE_URING, "Y") {
            skip(
                Need::Uring,
                test,
                &format!("cannot turn on {FUSE_ENABLE_URING} ({e}; needs root)"),
            );
            return None;
        }
        Some(FuseUring { previous })
    }
}

impl Drop for FuseUring {
    fn drop(&mut self) {
        let _ = std::fs::write(FUSE_ENABLE_URING, &self.previous);
    }
}

/// Every name `readdir(3)` gives for `dir`, `.` and `..` included (which
/// `std::fs::read_dir` leaves out), sorted.
pub fn raw_dir_names(dir: &std::path::Path) -> std::io::Result<Vec<String>> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: a NUL-terminated path.
    let d = unsafe { libc::opendir(c.as_ptr()) };
    if d.is_null() {
        return Err(std::io::Error::last_os_error());
    }
    let mut names = Vec::new();
    loop {
        // SAFETY: `d` is a live DIR* until closedir below.
        let ent = unsafe { libc::readdir64(d) };
        if ent.is_null() {
            break;
        }
        // SAFETY: readdir returned an entry whose name is NUL-terminated.
        let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) };
        names.push(name.to_string_lossy().into_owned());
    }
    // SAFETY: closed once.
    unsafe { libc::closedir(d) };
    names.sort();
    Ok(names)
}

//! The kernel's mount table, and unmounting.
//!
//! What is mounted is read from `/proc/self/mountinfo` every time, never remembered: a
//! mount can disappear behind our back (`umount` by hand, a dead FUSE server's
//! connection aborted), and a table we cannot read is an error, not "nothing mounted"
//! (an unmount that cannot see the table must not report success).
//!
//! mountinfo escapes four bytes in paths as three-digit octal: space (`\040`), tab
//! (`\011`), newline (`\012`) and backslash (`\134`); they are decoded before paths are
//! compared, so a mount point with any of them in its name is found.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Decodes mountinfo's octal escapes (`\NNN`) in one field.
fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(OsString::from_vec(out))
}

/// Mount points listed in mountinfo text (the fifth field of each line).
pub fn parse_mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .collect()
}

/// The device number (major, minor) of the topmost mount at `mountpoint`, read from the
/// mount table (no request to the file system mounted there, which may not answer).
pub fn device_of(mountpoint: &Path) -> io::Result<Option<(u32, u32)>> {
    let text = std::fs::read_to_string(MOUNTINFO)?;
    Ok(parse_device_of(&text, mountpoint))
}

fn parse_device_of(mountinfo: &str, mountpoint: &Path) -> Option<(u32, u32)> {
    mountinfo
        .lines()
        .filter(|l| l.split(' ').nth(4).map(unescape).as_deref() == Some(mountpoint))
        .filter_map(|l| {
            let (major, minor) = l.split(' ').nth(2)?.split_once(':')?;
            Some((major.parse().ok()?, minor.parse().ok()?))
        })
        .next_back()
}

/// Every mount point of this process's mount namespace, now.
pub fn mount_points() -> io::Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(MOUNTINFO).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("reading the mount table {MOUNTINFO}: {e}"),
        )
    })?;
    Ok(parse_mount_points(&text))
}

/// Whether `path` (absolute, as the kernel shows it: canonicalize first) is a mount
/// point now.
pub fn is_mounted(path: &Path) -> io::Result<bool> {
    Ok(mount_points()?.iter().any(|m| m == path))
}

/// Whether an unmount failed because files or directories in the mount are in use
/// (`EBUSY`; by kind, since the unmount error carries the path in its message).
pub fn is_busy(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::ResourceBusy
}

/// Unmounts a FUSE mount at `path`; not mounted is Ok; in use fails as [`is_busy`].
pub fn unmount_path(path: &Path) -> io::Result<()> {
    umount(path, false)
}

/// Detaches (lazily unmounts) a FUSE mount at `path`; not mounted is Ok.
pub fn detach_path(path: &Path) -> io::Result<()> {
    umount(path, true)
}

fn umount(path: &Path, lazy: bool) -> io::Result<()> {
    if !is_mounted(path)? {
        return Ok(());
    }
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: `c` is a NUL-terminated path that outlives the call; umount2(2) reads it
    // and touches no other memory of ours.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EPERM) {
        // Not root: the setuid helper unmounts FUSE mounts of the calling user.
        let mut cmd = std::process::Command::new("fusermount3");
        cmd.arg("-u");
        if lazy {
            cmd.arg("-z");
        }
        let out = cmd
            .arg(path)
            .stderr(std::process::Stdio::piped())
            .output()?;
        if out.status.success() {
            return Ok(());
        }
        // fusermount3 says "Device or resource busy" where umount2 gives EBUSY.
        if String::from_utf8_lossy(&out.stderr).contains("busy") {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
    }
    if err.raw_os_error() == Some(libc::EINVAL) && !is_mounted(path)? {
        return Ok(());
    }
    Err(io::Error::new(
        err.kind(),
        format!("unmounting {}: {err}", path.display()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_of_a_mount_point_is_its_topmost_mount() {
        let text = "\
22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda rw
36 22 0:32 / /mnt/with\\040space rw - fuse.tidepool tidepool rw
37 22 259:1048577 / /mnt/x rw - fuse.tidepool a rw
38 37 0:40 / /mnt/x rw - fuse.tidepool b rw
";
        assert_eq!(
            parse_device_of(text, Path::new("/mnt/with space")),
            Some((0, 32))
        );
        assert_eq!(parse_device_of(text, Path::new("/mnt/x")), Some((0, 40)));
        assert_eq!(parse_device_of(text, Path::new("/mnt")), None);
    }

    #[test]
    fn mount_points_with_escaped_characters_are_decoded() {
        let text = "\
22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda rw
36 22 0:32 / /mnt/with\\040space rw - fuse.tidepool tidepool rw
37 22 0:33 / /mnt/tab\\011and\\012newline rw - fuse.tidepool x rw
38 22 0:34 / /mnt/back\\134slash rw - tmpfs tmpfs rw
39 22 0:35 / /mnt/not\\999octal rw - tmpfs tmpfs rw
";
        let points = parse_mount_points(text);
        assert_eq!(
            points,
            [
                PathBuf::from("/"),
                PathBuf::from("/mnt/with space"),
                PathBuf::from("/mnt/tab\tand\nnewline"),
                PathBuf::from("/mnt/back\\slash"),
                PathBuf::from("/mnt/not\\999octal"),
            ]
        );
    }

    #[test]
    fn the_root_is_mounted_and_a_plain_directory_is_not() {
        assert!(is_mounted(Path::new("/")).unwrap());
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_mounted(&dir.path().canonicalize().unwrap()).unwrap());
        // Unmounting something that is not mounted is Ok (idempotent).
        unmount_path(&dir.path().canonicalize().unwrap()).unwrap();
    }
}

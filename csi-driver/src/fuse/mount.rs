//! Mounting a FUSE file system: a /dev/fuse descriptor and a `mount(2)` naming it.
//!
//! As root (the CSI plugin, `tidepool mount` under sudo) we open /dev/fuse and mount
//! directly. Without the privilege, `fusermount3` (setuid root, from the fuse3 package)
//! mounts for us and passes the descriptor back over a socket (`_FUSE_COMMFD`).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::fdpass;

/// How to mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Shown as the mount's source in the mount table (e.g. the lake URL).
    pub fsname: String,
    /// The type shows as `fuse.<subtype>`.
    pub subtype: String,
    pub read_only: bool,
    /// Let users other than the mounting one in (pods run as many uids).
    pub allow_other: bool,
    /// Let the kernel check permissions from the mode bits.
    pub default_permissions: bool,
}

impl MountOptions {
    fn common(&self) -> Vec<String> {
        let mut o = Vec::new();
        if self.allow_other {
            o.push("allow_other".to_owned());
        }
        if self.default_permissions {
            o.push("default_permissions".to_owned());
        }
        o
    }
}

/// Characters that would split the comma-separated options.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c == ',' || c == '\\' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// Opens /dev/fuse and mounts it at `mountpoint`; returns the connection's descriptor.
pub fn mount(mountpoint: &Path, opts: &MountOptions) -> io::Result<OwnedFd> {
    match mount_direct(mountpoint, opts) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => mount_fusermount(mountpoint, opts),
        r => r,
    }
}

fn mount_direct(mountpoint: &Path, opts: &MountOptions) -> io::Result<OwnedFd> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "opening /dev/fuse: {e} (load the fuse module, or give the container /dev/fuse)"
                ),
            )
        })?;
    // SAFETY: getuid(2)/getgid(2) take nothing and cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = vec![
        format!("fd={}", dev.as_raw_fd()),
        "rootmode=40000".to_owned(),
        format!("user_id={uid}"),
        format!("group_id={gid}"),
    ];
    data.extend(opts.common());
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if opts.read_only {
        flags |= libc::MS_RDONLY;
    }
    let source = CString::new(sanitize(&opts.fsname)).map_err(io::Error::other)?;
    let target = CString::new(mountpoint.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let fstype =
        CString::new(format!("fuse.{}", sanitize(&opts.subtype))).map_err(io::Error::other)?;
    let data = CString::new(data.join(",")).map_err(io::Error::other)?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let r = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("mounting FUSE at {}: {e}", mountpoint.display()),
        ));
    }
    Ok(OwnedFd::from(dev))
}

fn mount_fusermount(mountpoint: &Path, opts: &MountOptions) -> io::Result<OwnedFd> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    // The child inherits `theirs` (std sockets are close-on-exec: clear it for it).
    let their_fd = theirs.as_raw_fd();
    let mut o = vec![
        if opts.read_only { "ro" } else { "rw" }.to_owned(),
        "nosuid".to_owned(),
        "nodev".to_owned(),
        format!("fsname={}", sanitize(&opts.fsname)),
        format!("subtype={}", sanitize(&opts.subtype)),
    ];
    o.extend(opts.common());
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg("-o")
        .arg(o.join(","))
        .arg("--")
        .arg(mountpoint)
        .env("_FUSE_COMMFD", their_fd.to_string())
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    use std::os::unix::process::CommandExt;
    // SAFETY: runs in the child between fork and exec and only calls fcntl(2), which is
    // async-signal-safe, on a descriptor the child inherited.
    unsafe {
        cmd.pre_exec(move || {
            let flags = libc::fcntl(their_fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(their_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("not root, and fusermount3 cannot run: {e} (install the fuse3 package, or run as root)"),
        )
    })?;
    drop(theirs);
    let mut byte = [0u8; 1];
    let received = fdpass::recv(&ours, &mut byte);
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "fusermount3 could not mount {}: {}",
                mountpoint.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    let (_, mut fds) = received?;
    fds.pop()
        .ok_or_else(|| io::Error::other("fusermount3 mounted but sent no /dev/fuse descriptor"))
}

//! The system calls under the checkpoint tree: errno and path helpers, `O_PATH` opens,
//! `fstat` into FUSE attributes, directory streams and the open flags a backing file
//! gets. No state of the tree lives here.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use crate::fuse::{DirBuf, Errno, FileKind, Timespec};

/// A `DIR*` of a directory being listed; its position cookies are the offsets the
/// kernel hands back.
pub(super) struct DirStream(*mut libc::DIR);

// SAFETY: the DIR* is only used under the DirHandle's mutex, by one thread at a time.
unsafe impl Send for DirStream {}

impl Drop for DirStream {
    fn drop(&mut self) {
        // SAFETY: the pointer came from fdopendir and is closed exactly once.
        unsafe { libc::closedir(self.0) };
    }
}

pub(super) fn errno(e: io::Error) -> Errno {
    e.raw_os_error().unwrap_or(libc::EIO)
}

pub(super) fn cstr(name: &OsStr) -> Result<CString, Errno> {
    CString::new(name.as_bytes()).map_err(|_| libc::EINVAL)
}

pub(super) fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL")
}

pub(super) fn fstat(fd: RawFd) -> Result<libc::stat, Errno> {
    // SAFETY: a zeroed stat is a valid out-buffer for fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is a live descriptor; st is a valid out-buffer.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(errno(io::Error::last_os_error()));
    }
    Ok(st)
}

pub(super) fn check(rc: libc::c_int) -> Result<(), Errno> {
    if rc < 0 {
        Err(errno(io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

pub(super) fn attr_of(ino: u64, st: &libc::stat) -> crate::fuse::abi::Attr {
    let kind = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        FileKind::Dir
    } else {
        FileKind::File
    };
    let ts = |s: i64, n: i64| Timespec {
        secs: s.max(0) as u64,
        nanos: n.clamp(0, 999_999_999) as u32,
    };
    crate::fuse::abi::Attr {
        ino,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: ts(st.st_atime, st.st_atime_nsec),
        mtime: ts(st.st_mtime, st.st_mtime_nsec),
        ctime: ts(st.st_ctime, st.st_ctime_nsec),
        kind,
        perm: st.st_mode & 0o7777,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        blksize: st.st_blksize as u32,
    }
}

/// A directory stream of the directory `fd` is an `O_PATH` descriptor of (for OPENDIR).
pub(super) fn open_dir_stream(fd: RawFd) -> Result<DirStream, Errno> {
    let path = proc_path(fd);
    // SAFETY: path is NUL-terminated.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(errno(io::Error::last_os_error()));
    }
    // SAFETY: fd is a directory descriptor we own; fdopendir takes it over.
    let dir = unsafe { libc::fdopendir(fd) };
    if dir.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so fd is still ours to close.
        unsafe { libc::close(fd) };
        return Err(errno(e));
    }
    Ok(DirStream(dir))
}

/// Lists a local directory from `offset`; returns whether its end was reached (false:
/// `out` is full).
pub(super) fn readdir_local(s: &DirStream, offset: u64, out: &mut DirBuf) -> Result<bool, Errno> {
    // SAFETY: the DIR* is live, and the caller holds its directory handle's lock.
    unsafe {
        if offset == 0 {
            libc::rewinddir(s.0);
        } else {
            libc::seekdir(s.0, offset as libc::c_long);
        }
        loop {
            let pos = libc::telldir(s.0);
            *libc::__errno_location() = 0;
            let ent = libc::readdir64(s.0);
            if ent.is_null() {
                let e = *libc::__errno_location();
                if e != 0 {
                    return Err(e);
                }
                return Ok(true);
            }
            let ent = &*ent;
            let name = std::ffi::CStr::from_ptr(ent.d_name.as_ptr());
            let name = OsStr::from_bytes(name.to_bytes());
            // "." and ".." are listed as the backing directory lists them (the inode
            // numbers users see are the backing ones, as `stat` shows them).
            let kind = match ent.d_type {
                libc::DT_DIR => FileKind::Dir,
                _ => FileKind::File,
            };
            if !out.add(ent.d_ino, ent.d_off as u64, kind, name, None) {
                libc::seekdir(s.0, pos);
                return Ok(false);
            }
        }
    }
}

/// Whether `name` exists in the directory `dirfd` is an `O_PATH` descriptor of (a
/// symlink counted as itself).
pub(super) fn exists_at(dirfd: RawFd, name: &OsStr) -> bool {
    let Ok(n) = cstr(name) else { return false };
    // SAFETY: a zeroed stat is a valid out-buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: dirfd is live, n NUL-terminated, st a valid out-buffer; AT_EMPTY_PATH is
    // not given, so the name is looked up in the directory.
    unsafe { libc::fstatat(dirfd, n.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) == 0 }
}

pub(super) fn open_path(dirfd: RawFd, name: &CString) -> Result<OwnedFd, Errno> {
    // SAFETY: dirfd is live (or AT_FDCWD) and name NUL-terminated.
    let fd = unsafe {
        libc::openat(
            dirfd,
            name.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(errno(io::Error::last_os_error()));
    }
    // SAFETY: openat returned a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The flags a backing file is opened with for an open(2) with `flags` on the volume.
pub(super) fn backing_flags(flags: u32) -> i32 {
    let f = flags as i32;
    // O_DIRECT is left out: requests arrive in our own (unaligned) buffers, and a
    // passthrough open keeps the caller's O_DIRECT on the caller's own I/O.
    (f & (libc::O_ACCMODE
        | libc::O_APPEND
        | libc::O_TRUNC
        | libc::O_SYNC
        | libc::O_DSYNC
        | libc::O_NOATIME))
        | libc::O_CLOEXEC
}

pub(super) fn is_write(flags: u32) -> bool {
    (flags as i32) & libc::O_ACCMODE != libc::O_RDONLY
}

//! Passing file descriptors over Unix sockets (`SCM_RIGHTS`).
//!
//! Used twice: `fusermount3` hands a mounted /dev/fuse descriptor back to an
//! unprivileged `tidepool mount`, and the CSI plugin hands the descriptors of the
//! volumes it mounted to the node agent (and back, after a restart of either). A
//! descriptor received this way shares its open file description with the sender's:
//! for /dev/fuse, the same connection and the same queue of requests.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Most descriptors one message carries.
pub const MAX_FDS: usize = 64;

fn cmsg_space(n: usize) -> usize {
    // SAFETY: CMSG_SPACE is a pure size computation.
    unsafe { libc::CMSG_SPACE((n * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// Sends `data` (at least one byte) with `fds` attached, in one `sendmsg`.
pub fn send(sock: &impl AsRawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    assert!(
        !data.is_empty(),
        "a message with descriptors carries data too"
    );
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("at most {MAX_FDS} descriptors per message"),
        ));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut control = vec![0u8; cmsg_space(fds.len().max(1))];
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = cmsg_space(fds.len()) as _;
        // SAFETY: the control buffer is CMSG_SPACE(fds) bytes, room for one header and
        // `fds.len()` descriptors; CMSG_FIRSTHDR/CMSG_DATA stay inside it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(c).cast::<RawFd>(),
                fds.len(),
            );
        }
    }
    let mut sent = 0;
    while sent == 0 {
        // SAFETY: `msg` points at `iov` and `control`, both alive for the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent = n as usize;
    }
    if sent < data.len() {
        // The descriptors went with the first byte; the rest follows plainly.
        let mut rest = &data[sent..];
        while !rest.is_empty() {
            // SAFETY: send(2) of a slice we own.
            let n = unsafe {
                libc::send(
                    sock.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            rest = &rest[n as usize..];
        }
    }
    Ok(())
}

/// Receives up to `buf.len()` bytes and any descriptors sent with them. Returns the
/// byte count (0 at end of stream) and the descriptors, owned (closed on drop).
pub fn recv(sock: &impl AsRawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = vec![0u8; cmsg_space(MAX_FDS)];
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() as _;
    let n = loop {
        // SAFETY: `msg` points at `iov` and `control`, both alive for the call;
        // MSG_CMSG_CLOEXEC keeps received descriptors out of our children.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        break n as usize;
    };
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote into `control`, with the
    // CMSG_* accessors, which stay inside `msg_controllen`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    // The kernel installed these descriptors for us: we own them now.
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other(
            "descriptors were dropped (more than fit in one message)",
        ));
    }
    Ok((n, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_descriptor_sent_is_the_same_open_file() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"shared offset").unwrap();
        send(&a, b"x", &[f.as_raw_fd()]).unwrap();
        let mut buf = [0u8; 8];
        let (n, fds) = recv(&b, &mut buf).unwrap();
        assert_eq!((n, &buf[..1]), (1, &b"x"[..]));
        assert_eq!(fds.len(), 1);
        let mut got = std::fs::File::from(fds.into_iter().next().unwrap());
        // One open file description: seeking one moves the other.
        got.seek(std::io::SeekFrom::Start(7)).unwrap();
        let mut rest = String::new();
        f.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "offset");
    }
}

/// Who is at the other end of a Unix socket (`SO_PEERCRED`, as it was at `connect`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
}

/// The credentials of `sock`'s peer.
pub fn peer_cred(sock: &impl AsRawFd) -> io::Result<PeerCred> {
    // SAFETY: an all-zero ucred is valid; getsockopt writes at most `len` bytes into it.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: as above; `cred` and `len` outlive the call.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
    })
}

/// Whether `sock`'s peer may use a node socket (the agent's or the keeper's): root (the
/// CSI plugin runs as root) or this process's own user. Their socket files are 0600 in
/// a root-only directory already; this holds even where a file mode or a mount gets
/// that wrong. A refusal is logged with the peer's uid and pid.
pub fn peer_allowed(sock: &impl AsRawFd, socket: &str) -> bool {
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    match peer_cred(sock) {
        Ok(p) if p.uid == 0 || p.uid == me => true,
        Ok(p) => {
            tracing::warn!(
                socket,
                uid = p.uid,
                pid = p.pid,
                "refused a connection: only root (the CSI plugin) may use this socket"
            );
            false
        }
        Err(e) => {
            tracing::warn!(socket, error = %e, "refused a connection whose peer cannot be told");
            false
        }
    }
}

//! The FUSE kernel protocol as Tidepool speaks it: opcodes, flags, and the encoding of
//! the requests it reads and the replies it writes (all little-endian on the hosts we
//! run on; the kernel uses native byte order and we build for little-endian targets).
//!
//! Numbers and layouts are the kernel's (`include/uapi/linux/fuse.h`); the structs are
//! not mirrored as `repr(C)` types but read and written field by field, so a short or
//! malformed request is an error value, never undefined behaviour. Only what a dataset
//! or checkpoint file system needs is here; other opcodes are answered `ENOSYS`.
//!
//! We require protocol 7.31 or later (Linux 5.7+), so every layout below is the modern
//! one; FUSE passthrough needs 7.40 (Linux 6.9) and is used only when offered.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

#[cfg(not(target_endian = "little"))]
compile_error!("the FUSE encoding here assumes a little-endian host");

pub const KERNEL_MAJOR: u32 = 7;
/// The minor version we answer with: the layouts below are those of 7.40; 7.41 and 7.42
/// only added INIT flags (and, in 7.42, the io_uring structures of `uring.rs`).
pub const KERNEL_MINOR: u32 = 42;
/// The oldest minor version we serve.
pub const MIN_MINOR: u32 = 31;
pub const ROOT_ID: u64 = 1;

/// Size of `fuse_in_header`.
pub const IN_HEADER: usize = 40;
/// Size of `fuse_out_header`.
pub const OUT_HEADER: usize = 16;
/// The kernel refuses reads of /dev/fuse into smaller buffers.
pub const MIN_READ_BUFFER: usize = 8192;

pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const COPY_FILE_RANGE: u32 = 47;
    pub const SYNCFS: u32 = 50;
    pub const TMPFILE: u32 = 51;

    /// The opcode's name, for reports.
    pub fn name(op: u32) -> &'static str {
        match op {
            LOOKUP => "LOOKUP",
            FORGET => "FORGET",
            GETATTR => "GETATTR",
            SETATTR => "SETATTR",
            MKNOD => "MKNOD",
            MKDIR => "MKDIR",
            UNLINK => "UNLINK",
            RMDIR => "RMDIR",
            RENAME => "RENAME",
            LINK => "LINK",
            OPEN => "OPEN",
            READ => "READ",
            WRITE => "WRITE",
            STATFS => "STATFS",
            RELEASE => "RELEASE",
            FSYNC => "FSYNC",
            GETXATTR => "GETXATTR",
            LISTXATTR => "LISTXATTR",
            FLUSH => "FLUSH",
            INIT => "INIT",
            OPENDIR => "OPENDIR",
            READDIR => "READDIR",
            RELEASEDIR => "RELEASEDIR",
            FSYNCDIR => "FSYNCDIR",
            ACCESS => "ACCESS",
            CREATE => "CREATE",
            INTERRUPT => "INTERRUPT",
            DESTROY => "DESTROY",
            BATCH_FORGET => "BATCH_FORGET",
            FALLOCATE => "FALLOCATE",
            READDIRPLUS => "READDIRPLUS",
            RENAME2 => "RENAME2",
            LSEEK => "LSEEK",
            SYNCFS => "SYNCFS",
            _ => "OTHER",
        }
    }
}

/// INIT flags (`flags | flags2 << 32`).
pub mod init {
    pub const ASYNC_READ: u64 = 1 << 0;
    pub const ATOMIC_O_TRUNC: u64 = 1 << 3;
    pub const BIG_WRITES: u64 = 1 << 5;
    pub const AUTO_INVAL_DATA: u64 = 1 << 12;
    pub const DO_READDIRPLUS: u64 = 1 << 13;
    pub const READDIRPLUS_AUTO: u64 = 1 << 14;
    pub const PARALLEL_DIROPS: u64 = 1 << 18;
    pub const MAX_PAGES: u64 = 1 << 22;
    pub const INIT_EXT: u64 = 1 << 30;
    pub const PASSTHROUGH: u64 = 1 << 37;
    /// The kernel can resend requests a server read but never answered (6.9+).
    pub const HAS_RESEND: u64 = 1 << 39;
    /// Requests may come through io_uring (6.14+, when the fuse module's `enable_uring`
    /// is set); see `uring.rs`.
    pub const OVER_IO_URING: u64 = 1 << 41;
}

/// `fuse_open_out.open_flags`.
pub mod fopen {
    pub const KEEP_CACHE: u32 = 1 << 1;
    pub const CACHE_DIR: u32 = 1 << 3;
    /// No FLUSH on close (5.16+). A close then never waits on the server, so a
    /// process closing a file (or exec'ing with it open) is not held up while the
    /// server restarts.
    pub const NOFLUSH: u32 = 1 << 5;
    pub const PASSTHROUGH: u32 = 1 << 7;
}

/// Notification codes (`fuse_out_header.error` of a message with `unique == 0`).
pub mod notify {
    pub const INVAL_ENTRY: i32 = 3;
    pub const RESEND: i32 = 7;
}

/// Set in `unique` of a request the kernel resends after `notify::RESEND`.
pub const UNIQUE_RESEND: u64 = 1 << 63;

/// `ioctl`s on /dev/fuse: `_IOW(229, 1, struct fuse_backing_map)` and
/// `_IOW(229, 2, uint32_t)`.
pub const DEV_IOC_BACKING_OPEN: libc::c_ulong = 0x4010_e501;
pub const DEV_IOC_BACKING_CLOSE: libc::c_ulong = 0x4004_e502;

/// `fuse_in_header`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// A request too short for its opcode, or otherwise malformed.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

/// Reads little-endian fields off a byte slice.
pub struct Cursor<'a>(pub &'a [u8]);

impl<'a> Cursor<'a> {
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Malformed> {
        if self.0.len() < n {
            return Err(Malformed(what));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    pub fn u16(&mut self, what: &'static str) -> Result<u16, Malformed> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    pub fn u32(&mut self, what: &'static str) -> Result<u32, Malformed> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    pub fn u64(&mut self, what: &'static str) -> Result<u64, Malformed> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    /// A NUL-terminated name (the rest of the payload up to its NUL).
    pub fn name(&mut self, what: &'static str) -> Result<&'a OsStr, Malformed> {
        let end = self.0.iter().position(|&b| b == 0).ok_or(Malformed(what))?;
        let name = &self.0[..end];
        self.0 = &self.0[end + 1..];
        Ok(OsStr::from_bytes(name))
    }
    pub fn rest(&self) -> &'a [u8] {
        self.0
    }
}

impl InHeader {
    pub fn parse(buf: &[u8]) -> Result<(InHeader, &[u8]), Malformed> {
        let mut c = Cursor(buf);
        let h = InHeader {
            len: c.u32("header")?,
            opcode: c.u32("header")?,
            unique: c.u64("header")?,
            nodeid: c.u64("header")?,
            uid: c.u32("header")?,
            gid: c.u32("header")?,
            pid: c.u32("header")?,
        };
        c.take(4, "header")?; // total_extlen, padding
        if (h.len as usize) < IN_HEADER || h.len as usize > buf.len() {
            return Err(Malformed("request length"));
        }
        Ok((h, &buf[IN_HEADER..h.len as usize]))
    }
}

/// `fuse_init_in`.
#[derive(Clone, Copy, Debug)]
pub struct InitIn {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u64,
}

impl InitIn {
    pub fn parse(b: &[u8]) -> Result<InitIn, Malformed> {
        let mut c = Cursor(b);
        let major = c.u32("init")?;
        let minor = c.u32("init")?;
        let max_readahead = c.u32("init")?;
        let flags = c.u32("init")? as u64;
        // flags2 exists from 7.36 on, when INIT_EXT is set.
        let flags2 = if flags & init::INIT_EXT != 0 {
            c.u32("init").unwrap_or(0) as u64
        } else {
            0
        };
        Ok(InitIn {
            major,
            minor,
            max_readahead,
            flags: flags | flags2 << 32,
        })
    }
}

/// `fuse_init_out` (7.40 layout, 64 bytes).
#[derive(Clone, Copy, Debug, Default)]
pub struct InitOut {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u64,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_write: u32,
    pub time_gran: u32,
    pub max_pages: u16,
    pub max_stack_depth: u32,
}

impl InitOut {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.major.to_le_bytes());
        out.extend_from_slice(&self.minor.to_le_bytes());
        out.extend_from_slice(&self.max_readahead.to_le_bytes());
        out.extend_from_slice(&(self.flags as u32).to_le_bytes());
        out.extend_from_slice(&self.max_background.to_le_bytes());
        out.extend_from_slice(&self.congestion_threshold.to_le_bytes());
        out.extend_from_slice(&self.max_write.to_le_bytes());
        out.extend_from_slice(&self.time_gran.to_le_bytes());
        out.extend_from_slice(&self.max_pages.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes()); // map_alignment
        out.extend_from_slice(&((self.flags >> 32) as u32).to_le_bytes());
        out.extend_from_slice(&self.max_stack_depth.to_le_bytes());
        out.extend_from_slice(&[0u8; 24]); // unused[6]
    }
}

/// File types as `fuse_attr.mode` and `fuse_dirent.type` carry them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
}

impl FileKind {
    fn mode_bits(self) -> u32 {
        match self {
            FileKind::File => libc::S_IFREG,
            FileKind::Dir => libc::S_IFDIR,
        }
    }
    fn dirent_type(self) -> u32 {
        match self {
            FileKind::File => libc::DT_REG as u32,
            FileKind::Dir => libc::DT_DIR as u32,
        }
    }
}

/// `fuse_attr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub kind: FileKind,
    pub perm: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub blksize: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timespec {
    pub secs: u64,
    pub nanos: u32,
}

impl Timespec {
    pub fn from_system(t: std::time::SystemTime) -> Self {
        let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Timespec {
            secs: d.as_secs(),
            nanos: d.subsec_nanos(),
        }
    }
}

impl Attr {
    pub const SIZE: usize = 88;

    pub fn encode(&self, out: &mut Vec<u8>) {
        for v in [
            self.ino,
            self.size,
            self.blocks,
            self.atime.secs,
            self.mtime.secs,
            self.ctime.secs,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [
            self.atime.nanos,
            self.mtime.nanos,
            self.ctime.nanos,
            self.kind.mode_bits() | (self.perm & 0o7777),
            self.nlink,
            self.uid,
            self.gid,
            0, // rdev
            self.blksize,
            0, // flags
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// How long the kernel may cache an entry or attributes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ttl {
    pub secs: u64,
    pub nanos: u32,
}

impl From<std::time::Duration> for Ttl {
    fn from(d: std::time::Duration) -> Self {
        Ttl {
            secs: d.as_secs(),
            nanos: d.subsec_nanos(),
        }
    }
}

/// `fuse_entry_out` (128 bytes): the answer to LOOKUP, and each READDIRPLUS entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryOut {
    /// The kernel's handle for the node (our inode number); `attr.ino` is what `stat`
    /// shows, which may differ (the checkpoint tree shows the backing file's).
    pub nodeid: u64,
    pub attr: Attr,
    pub generation: u64,
    pub entry_ttl: Ttl,
    pub attr_ttl: Ttl,
}

impl EntryOut {
    pub const SIZE: usize = 40 + Attr::SIZE;

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.nodeid.to_le_bytes());
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&self.entry_ttl.secs.to_le_bytes());
        out.extend_from_slice(&self.attr_ttl.secs.to_le_bytes());
        out.extend_from_slice(&self.entry_ttl.nanos.to_le_bytes());
        out.extend_from_slice(&self.attr_ttl.nanos.to_le_bytes());
        self.attr.encode(out);
    }
}

/// `fuse_attr_out` (104 bytes): the answer to GETATTR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttrOut {
    pub attr: Attr,
    pub ttl: Ttl,
}

impl AttrOut {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.ttl.secs.to_le_bytes());
        out.extend_from_slice(&self.ttl.nanos.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        self.attr.encode(out);
    }
}

/// `fuse_open_out` (16 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenOut {
    pub fh: u64,
    pub flags: u32,
    /// With [`fopen::PASSTHROUGH`]: the id from `DEV_IOC_BACKING_OPEN`.
    pub backing_id: u32,
}

impl OpenOut {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.fh.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.backing_id.to_le_bytes());
    }
}

/// `fuse_kstatfs` inside `fuse_statfs_out` (80 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatfsOut {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

impl StatfsOut {
    pub fn encode(&self, out: &mut Vec<u8>) {
        for v in [self.blocks, self.bfree, self.bavail, self.files, self.ffree] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [self.bsize, self.namelen, self.frsize, 0] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&[0u8; 24]); // spare[6]
    }
}

/// A READDIR or READDIRPLUS answer being filled, never longer than the kernel asked.
pub struct DirBuf {
    buf: Vec<u8>,
    max: usize,
    plus: bool,
}

fn align8(n: usize) -> usize {
    (n + 7) & !7
}

impl DirBuf {
    pub fn new(max: usize, plus: bool) -> Self {
        DirBuf {
            buf: Vec::with_capacity(max.min(64 * 1024)),
            max,
            plus,
        }
    }

    pub fn is_plus(&self) -> bool {
        self.plus
    }

    /// Adds one entry; `offset` is the cookie of the *next* entry. Returns false, adding
    /// nothing, when it does not fit (the kernel asks again from that entry's offset).
    /// READDIRPLUS buffers need `entry`; plain ones ignore it.
    pub fn add(
        &mut self,
        ino: u64,
        offset: u64,
        kind: FileKind,
        name: &OsStr,
        entry: Option<&EntryOut>,
    ) -> bool {
        let name = name.as_bytes();
        let dirent = align8(24 + name.len());
        let need = if self.plus {
            EntryOut::SIZE + dirent
        } else {
            dirent
        };
        if self.buf.len() + need > self.max {
            return false;
        }
        if self.plus {
            match entry {
                Some(e) => e.encode(&mut self.buf),
                // An entry without attributes: nodeid 0 tells the kernel to skip it.
                None => self.buf.extend_from_slice(&[0u8; EntryOut::SIZE]),
            }
        }
        self.buf.extend_from_slice(&ino.to_le_bytes());
        self.buf.extend_from_slice(&offset.to_le_bytes());
        self.buf
            .extend_from_slice(&(name.len() as u32).to_le_bytes());
        self.buf
            .extend_from_slice(&kind.dirent_type().to_le_bytes());
        self.buf.extend_from_slice(name);
        self.buf
            .resize(self.buf.len() + dirent - 24 - name.len(), 0);
        true
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

/// `fuse_read_in` (also READDIR/READDIRPLUS).
#[derive(Clone, Copy, Debug)]
pub struct ReadIn {
    pub fh: u64,
    pub offset: u64,
    pub size: u32,
    pub flags: u32,
}

impl ReadIn {
    pub fn parse(b: &[u8]) -> Result<ReadIn, Malformed> {
        let mut c = Cursor(b);
        let fh = c.u64("read")?;
        let offset = c.u64("read")?;
        let size = c.u32("read")?;
        c.u32("read")?; // read_flags
        c.u64("read")?; // lock_owner
        let flags = c.u32("read")?;
        Ok(ReadIn {
            fh,
            offset,
            size,
            flags,
        })
    }
}

/// `fuse_release_in`.
#[derive(Clone, Copy, Debug)]
pub struct ReleaseIn {
    pub fh: u64,
    pub flags: u32,
}

impl ReleaseIn {
    pub fn parse(b: &[u8]) -> Result<ReleaseIn, Malformed> {
        let mut c = Cursor(b);
        Ok(ReleaseIn {
            fh: c.u64("release")?,
            flags: c.u32("release")?,
        })
    }
}

/// `fuse_open_in`: the open(2) flags.
pub fn parse_open(b: &[u8]) -> Result<u32, Malformed> {
    Cursor(b).u32("open")
}

/// `fuse_forget_in`.
pub fn parse_forget(b: &[u8]) -> Result<u64, Malformed> {
    Cursor(b).u64("forget")
}

/// `fuse_batch_forget_in` and its `fuse_forget_one` entries: (nodeid, nlookup).
pub fn parse_batch_forget(b: &[u8]) -> Result<Vec<(u64, u64)>, Malformed> {
    let mut c = Cursor(b);
    let count = c.u32("batch forget")?;
    c.u32("batch forget")?;
    (0..count)
        .map(|_| Ok((c.u64("batch forget")?, c.u64("batch forget")?)))
        .collect()
}

/// `fuse_getattr_in`: the file handle, when the kernel names one.
pub fn parse_getattr(b: &[u8]) -> Result<Option<u64>, Malformed> {
    let mut c = Cursor(b);
    let flags = c.u32("getattr")?;
    c.u32("getattr")?;
    let fh = c.u64("getattr")?;
    Ok((flags & 1 != 0).then_some(fh))
}

/// `fuse_access_in`: the mask.
pub fn parse_access(b: &[u8]) -> Result<u32, Malformed> {
    Cursor(b).u32("access")
}

/// `fuse_setattr_in.valid` bits: which fields a SETATTR carries.
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
    pub const CTIME: u32 = 1 << 10;
}

/// `fuse_setattr_in` (88 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetattrIn {
    pub valid: u32,
    pub fh: u64,
    pub size: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl SetattrIn {
    pub fn parse(b: &[u8]) -> Result<SetattrIn, Malformed> {
        let mut c = Cursor(b);
        let w = "setattr";
        let valid = c.u32(w)?;
        c.u32(w)?;
        let fh = c.u64(w)?;
        let size = c.u64(w)?;
        c.u64(w)?; // lock_owner
        let atime = c.u64(w)?;
        let mtime = c.u64(w)?;
        c.u64(w)?; // ctime
        let atimensec = c.u32(w)?;
        let mtimensec = c.u32(w)?;
        c.u32(w)?; // ctimensec
        let mode = c.u32(w)?;
        c.u32(w)?;
        let uid = c.u32(w)?;
        let gid = c.u32(w)?;
        Ok(SetattrIn {
            valid,
            fh,
            size,
            atime: Timespec {
                secs: atime,
                nanos: atimensec,
            },
            mtime: Timespec {
                secs: mtime,
                nanos: mtimensec,
            },
            mode,
            uid,
            gid,
        })
    }
}

/// `fuse_write_in` (40 bytes) and the data after it.
#[derive(Clone, Copy, Debug)]
pub struct WriteIn<'a> {
    pub fh: u64,
    pub offset: u64,
    pub data: &'a [u8],
}

impl<'a> WriteIn<'a> {
    pub fn parse(b: &'a [u8]) -> Result<WriteIn<'a>, Malformed> {
        let mut c = Cursor(b);
        let fh = c.u64("write")?;
        let offset = c.u64("write")?;
        let size = c.u32("write")?;
        c.take(20, "write")?; // write_flags, lock_owner, flags, padding
        let data = c.take(size as usize, "write data")?;
        Ok(WriteIn { fh, offset, data })
    }
}

/// `fuse_write_out`: how many bytes were written.
pub fn write_out(size: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(8);
    v.extend_from_slice(&size.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

/// `fuse_create_in` (16 bytes) and the name: open flags, mode, umask.
#[derive(Clone, Copy, Debug)]
pub struct CreateIn<'a> {
    pub flags: u32,
    pub mode: u32,
    pub umask: u32,
    pub name: &'a OsStr,
}

impl<'a> CreateIn<'a> {
    pub fn parse(b: &'a [u8]) -> Result<CreateIn<'a>, Malformed> {
        let mut c = Cursor(b);
        let flags = c.u32("create")?;
        let mode = c.u32("create")?;
        let umask = c.u32("create")?;
        c.u32("create")?; // open_flags (7.38) or padding
        Ok(CreateIn {
            flags,
            mode,
            umask,
            name: c.name("create name")?,
        })
    }
}

/// `fuse_mknod_in` (16 bytes) and the name.
pub fn parse_mknod(b: &[u8]) -> Result<(u32, u32, &OsStr), Malformed> {
    let mut c = Cursor(b);
    let mode = c.u32("mknod")?;
    c.u32("mknod")?; // rdev
    let umask = c.u32("mknod")?;
    c.u32("mknod")?;
    Ok((mode, umask, c.name("mknod name")?))
}

/// `fuse_mkdir_in` (8 bytes) and the name: (mode, umask, name).
pub fn parse_mkdir(b: &[u8]) -> Result<(u32, u32, &OsStr), Malformed> {
    let mut c = Cursor(b);
    let mode = c.u32("mkdir")?;
    let umask = c.u32("mkdir")?;
    Ok((mode, umask, c.name("mkdir name")?))
}

/// RENAME (`fuse_rename_in`, 8 bytes) or RENAME2 (`fuse_rename2_in`, 16 bytes with the
/// `renameat2` flags), then the old and the new name.
#[derive(Clone, Copy, Debug)]
pub struct RenameIn<'a> {
    pub newdir: u64,
    pub flags: u32,
    pub old: &'a OsStr,
    pub new: &'a OsStr,
}

impl<'a> RenameIn<'a> {
    pub fn parse(b: &'a [u8], rename2: bool) -> Result<RenameIn<'a>, Malformed> {
        let mut c = Cursor(b);
        let newdir = c.u64("rename")?;
        let flags = if rename2 {
            let f = c.u32("rename")?;
            c.u32("rename")?;
            f
        } else {
            0
        };
        Ok(RenameIn {
            newdir,
            flags,
            old: c.name("rename old name")?,
            new: c.name("rename new name")?,
        })
    }
}

/// `fuse_fsync_in`: (fh, datasync).
pub fn parse_fsync(b: &[u8]) -> Result<(u64, bool), Malformed> {
    let mut c = Cursor(b);
    let fh = c.u64("fsync")?;
    let flags = c.u32("fsync")?;
    Ok((fh, flags & 1 != 0))
}

/// `fuse_fallocate_in`.
#[derive(Clone, Copy, Debug)]
pub struct FallocateIn {
    pub fh: u64,
    pub offset: u64,
    pub length: u64,
    pub mode: u32,
}

impl FallocateIn {
    pub fn parse(b: &[u8]) -> Result<FallocateIn, Malformed> {
        let mut c = Cursor(b);
        Ok(FallocateIn {
            fh: c.u64("fallocate")?,
            offset: c.u64("fallocate")?,
            length: c.u64("fallocate")?,
            mode: c.u32("fallocate")?,
        })
    }
}

/// A whole message to the kernel: `fuse_out_header` then `payload`.
pub fn message(unique: u64, error: i32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OUT_HEADER + payload.len());
    out.extend_from_slice(&((OUT_HEADER + payload.len()) as u32).to_le_bytes());
    out.extend_from_slice(&error.to_le_bytes());
    out.extend_from_slice(&unique.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// `FUSE_NOTIFY_INVAL_ENTRY`: drop the kernel's dentry `name` under `parent`.
pub fn notify_inval_entry(parent: u64, name: &OsStr) -> Vec<u8> {
    let name = name.as_bytes();
    let mut p = Vec::with_capacity(16 + name.len() + 1);
    p.extend_from_slice(&parent.to_le_bytes());
    p.extend_from_slice(&(name.len() as u32).to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(name);
    p.push(0);
    message(0, notify::INVAL_ENTRY, &p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_the_kernels_sizes() {
        let attr = Attr {
            ino: 5,
            size: 10,
            blocks: 1,
            atime: Timespec::default(),
            mtime: Timespec::default(),
            ctime: Timespec::default(),
            kind: FileKind::File,
            perm: 0o444,
            nlink: 1,
            uid: 0,
            gid: 0,
            blksize: 4096,
        };
        let mut v = Vec::new();
        attr.encode(&mut v);
        assert_eq!(v.len(), Attr::SIZE);
        v.clear();
        EntryOut {
            nodeid: attr.ino,
            attr,
            generation: 0,
            entry_ttl: Ttl::default(),
            attr_ttl: Ttl::default(),
        }
        .encode(&mut v);
        assert_eq!(v.len(), 128);
        v.clear();
        AttrOut {
            attr,
            ttl: Ttl::default(),
        }
        .encode(&mut v);
        assert_eq!(v.len(), 104);
        v.clear();
        OpenOut::default().encode(&mut v);
        assert_eq!(v.len(), 16);
        v.clear();
        StatfsOut::default().encode(&mut v);
        assert_eq!(v.len(), 80);
        v.clear();
        InitOut::default().encode(&mut v);
        assert_eq!(v.len(), 64);
        // mode carries the type bits.
        let mut a = Vec::new();
        attr.encode(&mut a);
        let mode = u32::from_le_bytes(a[60..64].try_into().unwrap());
        assert_eq!(mode, libc::S_IFREG | 0o444);
    }

    #[test]
    fn dirents_are_padded_to_eight_bytes_and_never_overflow() {
        let mut d = DirBuf::new(80, false);
        assert!(d.add(2, 1, FileKind::File, OsStr::new("a"), None));
        assert!(d.add(3, 2, FileKind::Dir, OsStr::new("bcdefghij"), None));
        assert!(!d.add(4, 3, FileKind::File, OsStr::new("x"), None), "full");
        let b = d.into_bytes();
        assert_eq!(b.len(), 32 + 40);
        assert_eq!(u32::from_le_bytes(b[16..20].try_into().unwrap()), 1);
        assert_eq!(&b[24..25], b"a");
    }

    #[test]
    fn a_short_request_is_malformed_not_a_panic() {
        assert!(InHeader::parse(&[0u8; 10]).is_err());
        let mut h = vec![0u8; IN_HEADER];
        h[0..4].copy_from_slice(&(IN_HEADER as u32 + 100).to_le_bytes());
        assert!(InHeader::parse(&h).is_err(), "length past the buffer");
        assert!(ReadIn::parse(&[0u8; 12]).is_err());
        assert!(Cursor(b"abc").name("name").is_err(), "no NUL");
    }
}

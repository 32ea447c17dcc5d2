//! Tidepool's own FUSE layer: the kernel protocol (`abi`), mounting (`mount`), the
//! request loop (`session`) that file systems plug into through [`FileSystem`], and
//! FUSE over io_uring (`uring`: per-CPU queues, where the kernel offers them).
//!
//! Why not a FUSE library: a node agent restarted while pods read through its mounts
//! must take over connections that another process initialised (the kernel sends INIT
//! once per connection, and libraries wait for it), and must get back the requests the
//! dead process read but never answered. [`Session::resume`] does both; see
//! `session.rs`. The protocol surface a dataset or checkpoint volume needs is small,
//! and owning it also puts passthrough (`open_backing`) and notifications in one place.

pub mod abi;
pub mod mount;
pub mod session;
pub mod uring;

pub use abi::{
    AttrOut, CreateIn, DirBuf, EntryOut, FallocateIn, FileKind, OpenOut, RenameIn, SetattrIn,
    StatfsOut, Timespec, Ttl, WriteIn,
};
pub use mount::{MountOptions, mount};
pub use session::{
    ConnParams, Connection, Device, Errno, FileSystem, ReplyData, Request, Resume, Session,
    SessionConfig, Wait,
};

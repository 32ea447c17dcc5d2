//! FUSE over io_uring (Linux 6.14+, when the administrator has set
//! `/sys/module/fuse/parameters/enable_uring`): one queue per CPU, served by a thread
//! pinned to that CPU.
//!
//! Why: through /dev/fuse every request is a hand-off between CPUs. The kernel wakes
//! whichever worker has waited longest, on whatever CPU is idle, and the reply wakes the
//! caller on its own CPU again. On a VM each of those wake-ups is an inter-processor
//! interrupt through the hypervisor: measured on a 2-vCPU VM, an open and close of a
//! warm file took 75 us through /dev/fuse and 35 us with the caller and the workers
//! forced onto one CPU (3 us on the local disk). With io_uring the kernel puts a
//! request on the queue of the caller's CPU, so the thread that answers it runs where
//! the caller sleeps: a context switch instead of two interrupts. A dataset of many
//! small files pays this per file (OPEN), and that is where it shows.
//!
//! The protocol (`include/uapi/linux/fuse.h`, 7.42): after INIT agreed on
//! `FUSE_OVER_IO_URING`, each queue registers entries with `FUSE_IO_URING_CMD_REGISTER`
//! (an `IORING_OP_URING_CMD` on the /dev/fuse file, 128-byte SQEs): each entry is a
//! header buffer (`struct fuse_uring_req_header`: the in/out header, the opcode's own
//! header, and `fuse_uring_ent_in_out`) and a payload buffer. The command completes
//! when a request has been written into the entry; the answer goes back with
//! `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`, which also waits for the entry's next request.
//! The kernel switches the connection over once every CPU's queue has an entry; until
//! then, and always for FORGET and INTERRUPT, requests still come through /dev/fuse.
//!
//! A READ may be answered later from another thread ([`ReplyData`](super::ReplyData)):
//! the answer is posted to the queue's [`Mailbox`] and an eventfd wakes the queue's
//! thread, which commits it (the ring has one submitter).
//!
//! Not used where a connection is resumed by a new process (the node agent): requests
//! a dead process held in its ring entries are not resent by `FUSE_NOTIFY_RESEND`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use parking_lot::Mutex;

use super::abi::{self, InHeader};
use super::session::{Errno, ReplyTo, Worker};

const IORING_SETUP_SQE128: u32 = 1 << 10;
const IORING_FEAT_SINGLE_MMAP: u32 = 1 << 0;
const IORING_OFF_SQ_RING: i64 = 0;
const IORING_OFF_CQ_RING: i64 = 0x800_0000;
const IORING_OFF_SQES: i64 = 0x1000_0000;
const IORING_ENTER_GETEVENTS: u32 = 1 << 0;
const IORING_OP_READ: u8 = 22;
const IORING_OP_URING_CMD: u8 = 46;

const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;
/// `struct fuse_uring_req_header`: in/out header (128), op header (128), and
/// `fuse_uring_ent_in_out` (flags, commit_id, payload_sz, padding, reserved).
const HEADER_LEN: usize = 128 + 128 + 32;
const OP_IN: usize = 128;
const ENT_IN_OUT: usize = 256;
/// The kernel's `FUSE_MIN_READ_BUFFER`.
const MIN_PAYLOAD: usize = 8192;
/// Ring entries per queue: requests from one CPU in flight at once (READs waiting on
/// the lake hold theirs until answered).
pub const QUEUE_DEPTH: usize = 16;
/// `user_data` of the eventfd read.
const WAKE: u64 = u64::MAX;

/// Fault injection for tests: the queue of this CPU fails at its next answer as if its
/// ring refused the submission, leaving the request with the kernel (-1: none).
#[cfg(feature = "testing")]
pub static FAIL_QUEUE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

fn fault_injected(qid: u16) -> bool {
    #[cfg(feature = "testing")]
    {
        FAIL_QUEUE.load(Ordering::Relaxed) == i32::from(qid)
    }
    #[cfg(not(feature = "testing"))]
    {
        let _ = qid;
        false
    }
}

#[repr(C)]
#[derive(Default)]
struct SqringOffsets {
    head: u32,
    tail: u32,
    ring_mask: u32,
    ring_entries: u32,
    flags: u32,
    dropped: u32,
    array: u32,
    resv1: u32,
    user_addr: u64,
}

#[repr(C)]
#[derive(Default)]
struct CqringOffsets {
    head: u32,
    tail: u32,
    ring_mask: u32,
    ring_entries: u32,
    overflow: u32,
    cqes: u32,
    flags: u32,
    resv1: u32,
    user_addr: u64,
}

#[repr(C)]
#[derive(Default)]
struct Params {
    sq_entries: u32,
    cq_entries: u32,
    flags: u32,
    sq_thread_cpu: u32,
    sq_thread_idle: u32,
    features: u32,
    wq_fd: u32,
    resv: [u32; 3],
    sq_off: SqringOffsets,
    cq_off: CqringOffsets,
}

/// A memory mapping of the ring, unmapped on drop.
struct Map {
    ptr: *mut u8,
    len: usize,
}

impl Map {
    fn new(fd: RawFd, len: usize, offset: i64) -> io::Result<Map> {
        // SAFETY: a shared mapping of the io_uring file at one of its documented offsets;
        // the kernel checks the length.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Map {
            ptr: ptr.cast(),
            len,
        })
    }

    /// The `u32` at byte `off` (ring heads, tails, masks, array slots).
    fn u32_at(&self, off: u32) -> &AtomicU32 {
        assert!(off as usize + 4 <= self.len);
        // SAFETY: in bounds (checked), 4-aligned by the kernel's layout, and shared with
        // the kernel, hence atomic access.
        unsafe { &*(self.ptr.add(off as usize) as *const AtomicU32) }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A minimal io_uring with 128-byte SQEs: one submitter (the thread that owns it).
struct Ring {
    fd: OwnedFd,
    sq: Map,
    cq: Option<Map>,
    sqes: Map,
    p: Params,
    /// SQEs written and not yet submitted.
    pending: u32,
}

// SAFETY: the mappings are only touched by the thread that owns the Ring.
unsafe impl Send for Ring {}

impl Ring {
    fn new(entries: u32) -> io::Result<Ring> {
        let mut p = Params {
            flags: IORING_SETUP_SQE128,
            ..Default::default()
        };
        // SAFETY: io_uring_setup(2) fills in `p`, which lives across the call.
        let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, entries, &mut p as *mut Params) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let sq_len = p.sq_off.array as usize + p.sq_entries as usize * 4;
        let cq_len = p.cq_off.cqes as usize + p.cq_entries as usize * 16;
        let single = p.features & IORING_FEAT_SINGLE_MMAP != 0;
        let sq = Map::new(
            fd.as_raw_fd(),
            if single { sq_len.max(cq_len) } else { sq_len },
            IORING_OFF_SQ_RING,
        )?;
        let cq = if single {
            None
        } else {
            Some(Map::new(fd.as_raw_fd(), cq_len, IORING_OFF_CQ_RING)?)
        };
        let sqes = Map::new(fd.as_raw_fd(), p.sq_entries as usize * 128, IORING_OFF_SQES)?;
        Ok(Ring {
            fd,
            sq,
            cq,
            sqes,
            p,
            pending: 0,
        })
    }

    fn cq(&self) -> &Map {
        self.cq.as_ref().unwrap_or(&self.sq)
    }

    /// Queues one SQE (submitted by the next [`Self::enter`]); false if the ring is full.
    fn push(&mut self, sqe: &[u8; 128]) -> bool {
        let mask = self
            .sq
            .u32_at(self.p.sq_off.ring_mask)
            .load(Ordering::Relaxed);
        let head = self.sq.u32_at(self.p.sq_off.head).load(Ordering::Acquire);
        let tail = self.sq.u32_at(self.p.sq_off.tail).load(Ordering::Relaxed);
        if tail.wrapping_sub(head) >= self.p.sq_entries {
            return false;
        }
        let slot = tail & mask;
        assert!((slot as usize + 1) * 128 <= self.sqes.len);
        // SAFETY: slot is within the SQE array (checked); the kernel does not read it
        // until the tail moves past it below.
        unsafe {
            std::ptr::copy_nonoverlapping(sqe.as_ptr(), self.sqes.ptr.add(slot as usize * 128), 128)
        };
        self.sq
            .u32_at(self.p.sq_off.array + slot * 4)
            .store(slot, Ordering::Relaxed);
        self.sq
            .u32_at(self.p.sq_off.tail)
            .store(tail.wrapping_add(1), Ordering::Release);
        self.pending += 1;
        true
    }

    /// Submits what was pushed and waits for at least `wait` completions.
    fn enter(&mut self, wait: u32) -> io::Result<()> {
        let flags = if wait > 0 { IORING_ENTER_GETEVENTS } else { 0 };
        // SAFETY: io_uring_enter(2) on our ring, no signal mask argument.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_uring_enter,
                self.fd.as_raw_fd(),
                self.pending,
                wait,
                flags,
                std::ptr::null::<libc::c_void>(),
                0usize,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                return Ok(());
            }
            return Err(e);
        }
        self.pending = self.pending.saturating_sub(r as u32);
        Ok(())
    }

    /// Takes every completion there is: (user_data, res).
    fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        let cq = self.cq();
        let off = &self.p.cq_off;
        let mask = cq.u32_at(off.ring_mask).load(Ordering::Relaxed);
        let mut head = cq.u32_at(off.head).load(Ordering::Relaxed);
        let tail = cq.u32_at(off.tail).load(Ordering::Acquire);
        while head != tail {
            let at = off.cqes as usize + (head & mask) as usize * 16;
            assert!(at + 16 <= cq.len);
            // SAFETY: in bounds (checked); the kernel wrote this CQE before moving the
            // tail (acquire above).
            let (ud, res) = unsafe {
                let p = cq.ptr.add(at);
                (
                    std::ptr::read_unaligned(p as *const u64),
                    std::ptr::read_unaligned(p.add(8) as *const i32),
                )
            };
            out.push((ud, res));
            head = head.wrapping_add(1);
        }
        cq.u32_at(off.head).store(head, Ordering::Release);
    }
}

/// A `IORING_OP_URING_CMD` SQE on the /dev/fuse file for queue `qid`.
fn fuse_cmd(dev: RawFd, cmd_op: u32, qid: u16, commit_id: u64, user_data: u64) -> [u8; 128] {
    let mut s = [0u8; 128];
    s[0] = IORING_OP_URING_CMD;
    s[4..8].copy_from_slice(&dev.to_le_bytes());
    s[8..12].copy_from_slice(&cmd_op.to_le_bytes());
    s[32..40].copy_from_slice(&user_data.to_le_bytes());
    // struct fuse_uring_cmd_req in the command area (offset 48): flags, commit_id, qid.
    s[56..64].copy_from_slice(&commit_id.to_le_bytes());
    s[64..66].copy_from_slice(&qid.to_le_bytes());
    s
}

/// An answer for a queue's entry: (entry, unique, answer).
type Posted = (u32, u64, Result<Vec<u8>, Errno>);

/// Answers posted for a queue's entries from other threads, and the eventfd that wakes
/// the queue's thread to commit them.
pub struct Mailbox {
    posted: Mutex<Vec<Posted>>,
    wake: OwnedFd,
}

impl Mailbox {
    pub(super) fn post(&self, entry: u32, unique: u64, r: Result<Vec<u8>, Errno>) {
        self.posted.lock().push((entry, unique, r));
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write to our eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

/// One ring entry's buffers. The kernel holds their addresses from registration on.
struct Entry {
    header: Box<[u8; HEADER_LEN]>,
    payload: Vec<u8>,
    iov: Box<[libc::iovec; 2]>,
    live: bool,
}

/// The CPUs the kernel may put requests on (`nr_cpu_ids`): one queue each.
pub fn possible_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            s.trim()
                .split(',')
                .filter_map(|r| r.rsplit('-').next()?.parse::<usize>().ok())
                .max()
        })
        .map(|m| m + 1)
        // SAFETY: sysconf(3) has no memory effects.
        .unwrap_or_else(|| unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as usize)
}

/// Starts one thread per possible CPU serving that CPU's queue. Called once INIT has
/// agreed on io_uring. Returns the threads; they end when the connection does.
pub(super) fn start(
    worker: &Worker,
    dev: RawFd,
    max_write: u32,
    max_pages: u32,
) -> io::Result<Vec<std::thread::JoinHandle<()>>> {
    let payload_len = MIN_PAYLOAD
        .max(max_write as usize)
        .max(max_pages as usize * 4096);
    let mut threads = Vec::new();
    for qid in 0..possible_cpus() {
        let worker = worker.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("fuse-ring-{qid}"))
                .spawn(move || {
                    if let Err(e) = serve_queue(worker, dev, qid as u16, payload_len) {
                        tracing::warn!(queue = qid, error = %e, "FUSE over io_uring: this queue stopped; requests go through /dev/fuse if the kernel has not switched over yet");
                    }
                })?,
        );
    }
    Ok(threads)
}

fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays within it for
    // cpu < CPU_SETSIZE; sched_setaffinity(2) reads it. Failure (an offline CPU)
    // leaves the thread unpinned, which is only slower.
    unsafe {
        if cpu >= libc::CPU_SETSIZE as usize {
            return;
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn serve_queue(worker: Worker, dev: RawFd, qid: u16, payload_len: usize) -> io::Result<()> {
    pin_to(qid as usize);
    let mut ring = Ring::new((QUEUE_DEPTH * 2 + 2) as u32)?;
    // SAFETY: eventfd(2) returns a new descriptor we own (or -1).
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if efd < 0 {
        return Err(io::Error::last_os_error());
    }
    let mailbox = Arc::new(Mailbox {
        posted: Mutex::new(Vec::new()),
        // SAFETY: a new descriptor we own.
        wake: unsafe { OwnedFd::from_raw_fd(efd) },
    });
    let mut entries: Vec<Entry> = (0..QUEUE_DEPTH)
        .map(|_| {
            let mut header = Box::new([0u8; HEADER_LEN]);
            let mut payload = vec![0u8; payload_len];
            let iov = Box::new([
                libc::iovec {
                    iov_base: header.as_mut_ptr().cast(),
                    iov_len: HEADER_LEN,
                },
                libc::iovec {
                    iov_base: payload.as_mut_ptr().cast(),
                    iov_len: payload_len,
                },
            ]);
            Entry {
                header,
                payload,
                iov,
                live: true,
            }
        })
        .collect();
    for (i, e) in entries.iter().enumerate() {
        let mut sqe = fuse_cmd(dev, FUSE_IO_URING_CMD_REGISTER, qid, 0, i as u64);
        sqe[16..24].copy_from_slice(&(e.iov.as_ptr() as u64).to_le_bytes());
        sqe[24..28].copy_from_slice(&2u32.to_le_bytes());
        assert!(ring.push(&sqe));
    }
    let mut wake_buf = Box::new(0u64);
    let arm_wake = |ring: &mut Ring, buf: &mut u64| {
        let mut s = [0u8; 128];
        s[0] = IORING_OP_READ;
        s[4..8].copy_from_slice(&mailbox.wake.as_raw_fd().to_le_bytes());
        s[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        s[16..24].copy_from_slice(&(buf as *mut u64 as u64).to_le_bytes());
        s[24..28].copy_from_slice(&8u32.to_le_bytes());
        s[32..40].copy_from_slice(&WAKE.to_le_bytes());
        ring.push(&s)
    };
    let mut wake_armed = arm_wake(&mut ring, &mut wake_buf);
    assert!(wake_armed);
    let mut done = Vec::new();
    let mut msg = Vec::with_capacity(4096);
    let mut first_error: Option<i32> = None;
    // The kernel writes requests into the entries' buffers and the eventfd's count into
    // `wake_buf` for as long as their operations are outstanding, and a closed ring
    // cancels them only after this thread has gone. So none of that memory may be freed
    // before every operation on it has completed: at the end the eventfd read is
    // completed and reaped, and on a failure with entries perhaps still registered the
    // buffers are leaked (one queue's, once) rather than freed under the kernel.
    // A request came through this queue (or, below, through any queue of the
    // connection): the kernel has switched the connection over, and requests from this
    // CPU have no other server.
    let mut served = false;
    // An entry came back because the connection is ending (unmounted or aborted): the
    // queue's end is the connection's, whatever other errors came before.
    let mut teardown = false;
    let outcome = (|| -> io::Result<Option<i32>> {
        let mut abandoned = false;
        loop {
            ring.enter(1)?;
            done.clear();
            ring.reap(&mut done);
            for &(ud, res) in &done {
                if ud == WAKE {
                    wake_armed = arm_wake(&mut ring, &mut wake_buf);
                    continue;
                }
                let i = ud as usize;
                if res < 0 {
                    // The connection ended (ENOTCONN), or the kernel refused the entry:
                    // either way it holds the entry no longer.
                    entries[i].live = false;
                    teardown |= matches!(-res, libc::ENOTCONN | libc::ENODEV | libc::ECANCELED);
                    first_error.get_or_insert(-res);
                    continue;
                }
                served = true;
                let e = &mut entries[i];
                let reply = handle_entry(&worker, e, &mailbox, i as u32, &mut msg);
                if let Some((unique, r)) = reply {
                    abandoned |= fault_injected(qid)
                        || !commit(&mut ring, dev, qid, &mut entries[i], i, unique, r);
                }
            }
            let posted = std::mem::take(&mut *mailbox.posted.lock());
            for (i, unique, r) in posted {
                abandoned |= !commit(
                    &mut ring,
                    dev,
                    qid,
                    &mut entries[i as usize],
                    i as usize,
                    unique,
                    r,
                );
            }
            if abandoned {
                return Err(io::Error::other(
                    "cannot submit to the queue's ring; its entries stay with the kernel",
                ));
            }
            if entries.iter().all(|e| !e.live) {
                return Ok(first_error);
            }
        }
    })();
    match outcome {
        Ok(first_error) if !wake_armed || drain_wake(&mut ring, &mailbox) => match first_error {
            _ if teardown => Ok(()),
            None => Ok(()),
            Some(e) => {
                let e = io::Error::from_raw_os_error(e);
                if served || worker.connection().io_uring_requests() > 0 {
                    // The kernel took every entry back with an error while the
                    // connection lives, after it switched over (a request came through
                    // a ring): this CPU's requests would wait for none.
                    end_connection(&worker, qid, &e);
                }
                Err(e)
            }
        },
        Ok(_) => {
            // Every entry is back, but the eventfd read would not complete.
            std::mem::forget(wake_buf);
            Ok(())
        }
        Err(e) => {
            let leaked = entries.len() * (HEADER_LEN + payload_len);
            tracing::error!(queue = qid, error = %e, leaked_bytes = leaked, "FUSE over io_uring: this queue failed with requests perhaps still in the kernel; its buffers are left to the kernel");
            std::mem::forget(entries);
            std::mem::forget(wake_buf);
            if served || worker.connection().io_uring_requests() > 0 {
                end_connection(&worker, qid, &e);
            }
            Err(e)
        }
    }
}

/// A queue failed after the kernel switched the connection over: requests from its CPU
/// (the kernel picks the queue by the caller's CPU) would wait forever for a server.
/// The connection is ended instead (fusectl's abort), so that every reader gets an
/// error at once (`ECONNABORTED`, then `ENOTCONN`) and the volume must be mounted again,
/// rather than readers hanging.
fn end_connection(worker: &Worker, qid: u16, cause: &io::Error) {
    let why = format!("FUSE over io_uring: the queue of CPU {qid} failed ({cause})");
    match worker.connection().abort(&why) {
        Ok(()) => {
            tracing::error!(queue = qid, error = %cause, "FUSE over io_uring: a queue failed, and requests from its CPU would have waited forever; the connection was ended instead: reads of this volume fail with ENOTCONN until it is mounted again")
        }
        Err(e) => {
            tracing::error!(queue = qid, error = %cause, abort_error = %e, "FUSE over io_uring: a queue failed, and the connection could not be ended: requests from its CPU wait until the volume is unmounted (umount -l, or mount fusectl and write 1 to its abort file)")
        }
    }
}

/// Completes the queue's outstanding eventfd read (by signalling the eventfd) and reaps
/// it, so that its buffer can be freed; false if the ring would not say it completed.
fn drain_wake(ring: &mut Ring, mailbox: &Mailbox) -> bool {
    let one = 1u64.to_ne_bytes();
    // SAFETY: write(2) of 8 bytes we own to the eventfd.
    let _ = unsafe { libc::write(mailbox.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    let mut done = Vec::new();
    for _ in 0..64 {
        if ring.enter(1).is_err() {
            return false;
        }
        done.clear();
        ring.reap(&mut done);
        if done.iter().any(|&(ud, _)| ud == WAKE) {
            return true;
        }
    }
    false
}

/// Hands the request in entry `e` to the file system; returns the answer if it was
/// given now (a READ may answer later, through the mailbox).
fn handle_entry(
    worker: &Worker,
    e: &mut Entry,
    mailbox: &Arc<Mailbox>,
    index: u32,
    msg: &mut Vec<u8>,
) -> Option<(u64, Result<Vec<u8>, Errno>)> {
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let payload_sz = u32_at(&e.header[..], ENT_IN_OUT + 16) as usize;
    let len = u32_at(&e.header[..], 0) as usize;
    let unique = u64::from_le_bytes(e.header[8..16].try_into().unwrap());
    // The opcode's own header is what the request's length leaves after the in header
    // and the payload.
    let op_len = len.checked_sub(abi::IN_HEADER + payload_sz);
    let (Some(op_len), true) = (op_len, payload_sz <= e.payload.len()) else {
        return Some((unique, Err(libc::EIO)));
    };
    if op_len > 128 {
        return Some((unique, Err(libc::EIO)));
    }
    msg.clear();
    msg.extend_from_slice(&e.header[..abi::IN_HEADER]);
    msg.extend_from_slice(&e.header[OP_IN..OP_IN + op_len]);
    msg.extend_from_slice(&e.payload[..payload_sz]);
    let (h, payload): (InHeader, &[u8]) = match InHeader::parse(msg) {
        Ok(x) => x,
        Err(_) => return Some((unique, Err(libc::EIO))),
    };
    worker.count_ring_request();
    let mb = mailbox.clone();
    worker
        .dispatch_for(h, payload, move || ReplyTo::Ring(mb, index))
        .map(|r| (unique, r))
}

/// Writes the answer into entry `i` and queues its COMMIT_AND_FETCH; false if the ring
/// would take no submission (the entry is then lost to this queue, still registered).
fn commit(
    ring: &mut Ring,
    dev: RawFd,
    qid: u16,
    e: &mut Entry,
    i: usize,
    unique: u64,
    r: Result<Vec<u8>, Errno>,
) -> bool {
    if !e.live {
        return true;
    }
    let (error, data): (i32, &[u8]) = match &r {
        Ok(d) if d.len() <= e.payload.len() => (0, d),
        Ok(_) => (-libc::EIO, &[]),
        Err(errno) => (-errno, &[]),
    };
    e.payload[..data.len()].copy_from_slice(data);
    let h = &mut e.header;
    h[0..4].copy_from_slice(&((abi::OUT_HEADER + data.len()) as u32).to_le_bytes());
    h[4..8].copy_from_slice(&error.to_le_bytes());
    h[8..16].copy_from_slice(&unique.to_le_bytes());
    h[ENT_IN_OUT + 8..ENT_IN_OUT + 16].copy_from_slice(&unique.to_le_bytes());
    h[ENT_IN_OUT + 16..ENT_IN_OUT + 20].copy_from_slice(&(data.len() as u32).to_le_bytes());
    let sqe = fuse_cmd(
        dev,
        FUSE_IO_URING_CMD_COMMIT_AND_FETCH,
        qid,
        unique,
        i as u64,
    );
    while !ring.push(&sqe) {
        // Full of submissions not yet entered: submit them first.
        if ring.enter(0).is_err() {
            e.live = false;
            return false;
        }
    }
    true
}

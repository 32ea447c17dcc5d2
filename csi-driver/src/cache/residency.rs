//! The residency map of one cached blob version: which fixed-size blocks of the local
//! sparse data file hold verified lake bytes.
//!
//! File format (`<key>.map`, little endian):
//! - header, 64 bytes: magic `TPRESMAP`, format version (u32), block size (u32), blob
//!   size (u64), flags (u32: bit 0 = whole-object MD5 verified, bit 1 = fetched again
//!   after an MD5 mismatch, bit 2 = the lake's MD5 disagrees with its bytes), the *trusted boot*
//!   (16 bytes, see below), zero padding;
//! - one 8-byte slot per block: CRC32C of the block's bytes (u32) then the marker
//!   `RSDT` (u32). A slot without the marker is a block that is not resident.
//!
//! Crash safety rests on one ordering: a block's data is written to the data file
//! *before* its slot is written, each with a single `pwrite`. A process killed at any
//! moment (`kill -9`, OOM) leaves either no slot (the block is fetched again) or a slot
//! whose data write had completed: both writes are in the kernel's page cache, which
//! outlives the process and which every later reader sees.
//!
//! Power loss or a kernel crash is different: the kernel may have persisted the slot and
//! not the data. So the map records the boot (Linux `boot_id`) during which every
//! resident block was either written or checked against its CRC32C. Opened in that same
//! boot, every resident block is trusted as is; opened in a later boot, each block is
//! checked before it is first served ([`Residency::is_verified`]), a mismatch drops the
//! slot so the block is fetched again, and once every resident block has been checked the
//! map is stamped with the new boot. This keeps warm opens free of re-reads (a 1 GiB
//! file opened again is not read twice) while never trusting bytes across a crash.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

const MAGIC: &[u8; 8] = b"TPRESMAP";
const VERSION: u32 = 1;
const HEADER: u64 = 64;
const MARKER: u32 = u32::from_le_bytes(*b"RSDT");
pub const FLAG_MD5_VERIFIED: u32 = 1;
/// The whole-object MD5 did not match once and the blocks were fetched again.
pub const FLAG_MD5_REFETCHED: u32 = 2;
/// The whole-object MD5 did not match the bytes the lake served, twice: the lake's
/// `Content-MD5` is wrong for this version (reads serve what the lake serves).
pub const FLAG_MD5_MISMATCH: u32 = 4;
const BOOT_AT: u64 = 28;

/// Identity of one boot of the machine. All zeros means unknown: never trusted.
pub type BootId = [u8; 16];

/// This boot's id, from `/proc/sys/kernel/random/boot_id` (zeros if unreadable, which
/// makes every open verify its blocks: slower, never unsafe).
pub fn current_boot() -> BootId {
    let mut id = [0u8; 16];
    let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") else {
        return id;
    };
    let hex: Vec<u8> = s.trim().bytes().filter(|b| *b != b'-').collect();
    if hex.len() != 32 {
        return [0; 16];
    }
    for (i, pair) in hex.chunks(2).enumerate() {
        match std::str::from_utf8(pair)
            .ok()
            .and_then(|p| u8::from_str_radix(p, 16).ok())
        {
            Some(b) => id[i] = b,
            None => return [0; 16],
        }
    }
    id
}

#[derive(Debug)]
pub struct Residency {
    /// The map file, open while it may still change: closed once every block is
    /// resident and the header is stamped with this boot, and opened again (by path:
    /// the pool never deletes the files of a blob version that is open) if a block is
    /// dropped or a flag set. A cached small file then holds one descriptor, not two,
    /// so the pool keeps more of them open.
    file: parking_lot::Mutex<Option<Arc<File>>>,
    path: PathBuf,
    block_size: u64,
    size: u64,
    blocks: u64,
    resident: Bits,
    verified: Bits,
    crcs: Vec<AtomicU32>,
    flags: AtomicU32,
    boot: BootId,
    /// The header names this boot: every resident block is verified.
    trusted: AtomicBool,
}

#[derive(Debug)]
struct Bits(Vec<AtomicU64>);

impl Bits {
    fn new(n: u64) -> Self {
        Bits((0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }
    fn get(&self, i: u64) -> bool {
        self.0[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }
    fn set(&self, i: u64, v: bool) {
        let w = &self.0[(i / 64) as usize];
        if v {
            w.fetch_or(1 << (i % 64), Ordering::AcqRel);
        } else {
            w.fetch_and(!(1 << (i % 64)), Ordering::AcqRel);
        }
    }
    fn count(&self) -> u64 {
        self.0
            .iter()
            .map(|w| w.load(Ordering::Acquire).count_ones() as u64)
            .sum()
    }
    fn fill_from(&self, other: &Bits) {
        for (a, b) in self.0.iter().zip(&other.0) {
            a.store(b.load(Ordering::Acquire), Ordering::Release);
        }
    }
}

impl Residency {
    /// Opens the map at `path`, creating it if missing. A map whose header does not match
    /// (another block size or blob size: a foreign or corrupt file) is reset to empty.
    /// `boot` is the running boot ([`current_boot`]): a map stamped with it is trusted.
    pub fn open(path: &Path, block_size: u64, size: u64, boot: BootId) -> io::Result<Self> {
        Self::open_or_reset(path, block_size, size, boot, false)
    }

    /// Creates an empty map at `path`, replacing whatever is there. For a data file that
    /// was just created: a map left over from an earlier data file describes bytes that
    /// are not in this one.
    pub fn create(path: &Path, block_size: u64, size: u64, boot: BootId) -> io::Result<Self> {
        Self::open_or_reset(path, block_size, size, boot, true)
    }

    fn open_or_reset(
        path: &Path,
        block_size: u64,
        size: u64,
        boot: BootId,
        reset: bool,
    ) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let blocks = size.div_ceil(block_size);
        let file = Arc::new(file);
        let r = Residency {
            file: parking_lot::Mutex::new(Some(file.clone())),
            path: path.to_owned(),
            block_size,
            size,
            blocks,
            resident: Bits::new(blocks),
            verified: Bits::new(blocks),
            crcs: (0..blocks).map(|_| AtomicU32::new(0)).collect(),
            flags: AtomicU32::new(0),
            boot,
            trusted: AtomicBool::new(false),
        };
        let mut header = [0u8; HEADER as usize];
        let ok = !reset
            && file.read_exact_at(&mut header, 0).is_ok()
            && &header[0..8] == MAGIC
            && u32::from_le_bytes(header[8..12].try_into().unwrap()) == VERSION
            && u32::from_le_bytes(header[12..16].try_into().unwrap()) as u64 == block_size
            && u64::from_le_bytes(header[16..24].try_into().unwrap()) == size;
        if !ok {
            file.set_len(0)?;
            header = [0u8; HEADER as usize];
            header[0..8].copy_from_slice(MAGIC);
            header[8..12].copy_from_slice(&VERSION.to_le_bytes());
            header[12..16].copy_from_slice(&(block_size as u32).to_le_bytes());
            header[16..24].copy_from_slice(&size.to_le_bytes());
            // Nothing is resident, so nothing is unverified: trusted from the start.
            header[BOOT_AT as usize..BOOT_AT as usize + 16].copy_from_slice(&boot);
            file.write_all_at(&header, 0)?;
            file.set_len(HEADER + blocks * 8)?;
            r.trusted.store(boot != [0; 16], Ordering::Release);
            return Ok(r);
        }
        r.flags.store(
            u32::from_le_bytes(header[24..28].try_into().unwrap()),
            Ordering::Release,
        );
        // Read slots in bounded chunks (a 1 TiB blob has 256 Ki slots = 2 MiB).
        let mut buf = vec![0u8; 64 * 1024];
        let mut i = 0u64;
        while i < blocks {
            let n = ((blocks - i) * 8).min(buf.len() as u64) as usize;
            let got = read_up_to(&file, &mut buf[..n], HEADER + i * 8)?;
            for slot in buf[..got].chunks_exact(8) {
                let crc = u32::from_le_bytes(slot[0..4].try_into().unwrap());
                let marker = u32::from_le_bytes(slot[4..8].try_into().unwrap());
                if marker == MARKER {
                    r.resident.set(i, true);
                    r.crcs[i as usize].store(crc, Ordering::Release);
                }
                i += 1;
            }
            if got < n {
                break;
            }
        }
        let stamped: BootId = header[BOOT_AT as usize..BOOT_AT as usize + 16]
            .try_into()
            .unwrap();
        if stamped == boot && boot != [0; 16] {
            r.verified.fill_from(&r.resident);
            r.trusted.store(true, Ordering::Release);
        } else {
            r.maybe_trust()?;
        }
        r.close_if_settled();
        Ok(r)
    }

    /// The map file, opened again if it was closed.
    fn file(&self) -> io::Result<Arc<File>> {
        let mut f = self.file.lock();
        if let Some(f) = &*f {
            return Ok(f.clone());
        }
        let opened = Arc::new(OpenOptions::new().read(true).write(true).open(&self.path)?);
        *f = Some(opened.clone());
        Ok(opened)
    }

    /// Closes the map file once nothing in it is expected to change.
    fn close_if_settled(&self) {
        if self.is_trusted() && self.is_complete() {
            *self.file.lock() = None;
        }
    }

    /// Whether the map file is open now (a descriptor the pool counts).
    pub fn holds_file(&self) -> bool {
        self.file.lock().is_some()
    }

    /// Stamps the header with this boot once no resident block is left unverified.
    fn maybe_trust(&self) -> io::Result<()> {
        if self.trusted.load(Ordering::Acquire) || self.boot == [0; 16] {
            return Ok(());
        }
        // Per word, resident before verified: a block that stays resident and
        // unverified throughout is always seen (a block being added may be seen as
        // unverified for a moment, which only delays the stamp).
        for (r, v) in self.resident.0.iter().zip(&self.verified.0) {
            let r = r.load(Ordering::Acquire);
            if r & !v.load(Ordering::Acquire) != 0 {
                return Ok(());
            }
        }
        self.file()?.write_all_at(&self.boot, BOOT_AT)?;
        self.trusted.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether every resident block may be served without a check (see the module docs).
    pub fn is_trusted(&self) -> bool {
        self.trusted.load(Ordering::Acquire)
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Byte range of block `i` (the last block may be short).
    pub fn block_range(&self, i: u64) -> std::ops::Range<u64> {
        let start = i * self.block_size;
        start..(start + self.block_size).min(self.size)
    }

    pub fn is_resident(&self, i: u64) -> bool {
        self.resident.get(i)
    }

    pub fn is_verified(&self, i: u64) -> bool {
        self.verified.get(i)
    }

    pub fn crc(&self, i: u64) -> u32 {
        self.crcs[i as usize].load(Ordering::Acquire)
    }

    pub fn resident_blocks(&self) -> u64 {
        self.resident.count()
    }

    /// Bytes of the blob held locally.
    pub fn resident_bytes(&self) -> u64 {
        (0..self.blocks)
            .filter(|&i| self.is_resident(i))
            .map(|i| self.block_range(i).end - self.block_range(i).start)
            .sum()
    }

    pub fn is_complete(&self) -> bool {
        self.resident_blocks() == self.blocks
    }

    /// Every block resident and written or checked in this boot: safe to hand the file
    /// to the kernel for passthrough reads.
    pub fn is_fully_verified(&self) -> bool {
        self.verified.count() == self.blocks
    }

    /// Records block `i` as resident with checksum `crc`. Call only after the block's
    /// data write has returned.
    pub fn mark_resident(&self, i: u64, crc: u32) -> io::Result<()> {
        let mut slot = [0u8; 8];
        slot[0..4].copy_from_slice(&crc.to_le_bytes());
        slot[4..8].copy_from_slice(&MARKER.to_le_bytes());
        self.file()?.write_all_at(&slot, HEADER + i * 8)?;
        self.crcs[i as usize].store(crc, Ordering::Release);
        self.resident.set(i, true);
        self.verified.set(i, true);
        self.maybe_trust()?;
        self.close_if_settled();
        Ok(())
    }

    /// A block read from disk matched its checksum.
    pub fn mark_verified(&self, i: u64) -> io::Result<()> {
        self.verified.set(i, true);
        self.maybe_trust()?;
        self.close_if_settled();
        Ok(())
    }

    /// Forget block `i` (its bytes failed verification).
    pub fn drop_block(&self, i: u64) -> io::Result<()> {
        self.resident.set(i, false);
        self.verified.set(i, false);
        self.file()?.write_all_at(&[0u8; 8], HEADER + i * 8)?;
        self.maybe_trust()
    }

    pub fn flags(&self) -> u32 {
        self.flags.load(Ordering::Acquire)
    }

    pub fn set_flag(&self, flag: u32) -> io::Result<()> {
        let f = self.flags.fetch_or(flag, Ordering::AcqRel) | flag;
        self.file()?.write_all_at(&f.to_le_bytes(), 24)?;
        self.close_if_settled();
        Ok(())
    }

    /// Makes the map's writes durable (those made through a descriptor since closed
    /// too: the data to sync belongs to the file, not the descriptor).
    pub fn sync(&self) -> io::Result<()> {
        let open = self.file.lock().clone();
        match open {
            Some(f) => f.sync_data(),
            None => OpenOptions::new().write(true).open(&self.path)?.sync_data(),
        }
    }
}

/// Resident bytes recorded in the map at `path`, read without opening it for use (the
/// pool's start-up scan). `None` if it is not a map of this format.
pub fn resident_bytes_at(path: &Path) -> io::Result<Option<u64>> {
    let file = File::open(path)?;
    let mut header = [0u8; HEADER as usize];
    if read_up_to(&file, &mut header, 0)? < HEADER as usize
        || &header[0..8] != MAGIC
        || u32::from_le_bytes(header[8..12].try_into().unwrap()) != VERSION
    {
        return Ok(None);
    }
    let block_size = u32::from_le_bytes(header[12..16].try_into().unwrap()) as u64;
    let size = u64::from_le_bytes(header[16..24].try_into().unwrap());
    if block_size == 0 {
        return Ok(None);
    }
    let blocks = size.div_ceil(block_size);
    let mut bytes = 0;
    let mut buf = vec![0u8; 64 * 1024];
    let mut i = 0u64;
    while i < blocks {
        let n = ((blocks - i) * 8).min(buf.len() as u64) as usize;
        let got = read_up_to(&file, &mut buf[..n], HEADER + i * 8)?;
        for slot in buf[..got].chunks_exact(8) {
            if u32::from_le_bytes(slot[4..8].try_into().unwrap()) == MARKER {
                bytes += (block_size * (i + 1)).min(size) - block_size * i;
            }
            i += 1;
        }
        if got < n {
            break;
        }
    }
    Ok(Some(bytes))
}

fn read_up_to(f: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT_A: BootId = [1; 16];
    const BOOT_B: BootId = [2; 16];

    #[test]
    fn slots_survive_reopen_and_torn_slots_are_not_resident() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        let r = Residency::open(&p, 4, 10, BOOT_A).unwrap();
        assert_eq!(r.blocks(), 3);
        assert_eq!(r.block_range(2), 8..10);
        r.mark_resident(0, 7).unwrap();
        r.mark_resident(2, 9).unwrap();
        drop(r);
        // Simulate a slot torn by a crash: crc written, marker not.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&5u32.to_le_bytes(), HEADER + 8).unwrap();
        let r = Residency::open(&p, 4, 10, BOOT_A).unwrap();
        assert!(r.is_resident(0) && !r.is_resident(1) && r.is_resident(2));
        assert_eq!(r.crc(2), 9);
        assert_eq!(r.resident_bytes(), 4 + 2);
        // Another geometry resets the map.
        let r = Residency::open(&p, 8, 10, BOOT_A).unwrap();
        assert_eq!(r.resident_blocks(), 0);
    }

    #[test]
    fn blocks_are_trusted_within_a_boot_and_checked_again_after_a_reboot() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        let r = Residency::open(&p, 4, 12, BOOT_A).unwrap();
        r.mark_resident(0, 1).unwrap();
        r.mark_resident(1, 2).unwrap();
        drop(r);
        // Same boot (a restarted process): everything resident is served as is.
        let r = Residency::open(&p, 4, 12, BOOT_A).unwrap();
        assert!(r.is_trusted() && r.is_verified(0) && r.is_verified(1));
        drop(r);
        // Next boot: nothing is served before it is checked.
        let r = Residency::open(&p, 4, 12, BOOT_B).unwrap();
        assert!(!r.is_trusted() && !r.is_verified(0) && !r.is_verified(1));
        // A block written now does not make the old ones trusted.
        r.mark_resident(2, 3).unwrap();
        assert!(!r.is_trusted() && !r.is_verified(0));
        drop(r);
        let r = Residency::open(&p, 4, 12, BOOT_B).unwrap();
        assert!(
            !r.is_verified(0),
            "the map is not stamped while a block is unchecked"
        );
        r.mark_verified(0).unwrap();
        r.drop_block(1).unwrap(); // block 1 failed its check
        assert!(!r.is_trusted(), "block 2 is still unchecked");
        r.mark_verified(2).unwrap();
        assert!(
            r.is_trusted(),
            "stamped once no resident block is unchecked"
        );
        drop(r);
        let r = Residency::open(&p, 4, 12, BOOT_B).unwrap();
        assert!(r.is_verified(0) && !r.is_resident(1) && r.is_verified(2));
        // An unknown boot (no boot_id) never trusts.
        let r = Residency::open(&p, 4, 12, [0; 16]).unwrap();
        assert!(!r.is_trusted() && !r.is_verified(0));
    }
}

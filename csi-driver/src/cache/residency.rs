//! The residency map of one cached blob version: which fixed-size blocks of the local
//! sparse data file hold verified lake bytes.
//!
//! File format (`<key>.map`, little endian):
//! - header, 64 bytes: magic `TPRESMAP`, format version (u32), block size (u32), blob
//!   size (u64), flags (u32: bit 0 = whole-object MD5 verified), zero padding;
//! - one 8-byte slot per block: CRC32C of the block's bytes (u32) then the marker
//!   `RSDT` (u32). A slot without the marker is a block that is not resident.
//!
//! Crash safety rests on one ordering: a block's data is written to the data file
//! *before* its slot is written, each with a single `pwrite`. A process killed at any
//! moment leaves either no slot (the block is fetched again) or a slot whose data write
//! had completed. To also cover power loss, where the kernel may persist pages out of
//! order, a block read from disk is checked against its CRC32C before it is first served
//! in each process ([`Residency::is_verified`]); a mismatch drops the slot and the block
//! is fetched again.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const MAGIC: &[u8; 8] = b"TPRESMAP";
const VERSION: u32 = 1;
const HEADER: u64 = 64;
const MARKER: u32 = u32::from_le_bytes(*b"RSDT");
pub const FLAG_MD5_VERIFIED: u32 = 1;

#[derive(Debug)]
pub struct Residency {
    file: File,
    block_size: u64,
    size: u64,
    blocks: u64,
    resident: Bits,
    verified: Bits,
    crcs: Vec<AtomicU32>,
    flags: AtomicU32,
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
        self.0.iter().map(|w| w.load(Ordering::Acquire).count_ones() as u64).sum()
    }
}

impl Residency {
    /// Opens the map at `path`, creating it if missing. A map whose header does not match
    /// (another block size or blob size: a foreign or corrupt file) is reset to empty.
    pub fn open(path: &Path, block_size: u64, size: u64) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let blocks = size.div_ceil(block_size);
        let r = Residency {
            file,
            block_size,
            size,
            blocks,
            resident: Bits::new(blocks),
            verified: Bits::new(blocks),
            crcs: (0..blocks).map(|_| AtomicU32::new(0)).collect(),
            flags: AtomicU32::new(0),
        };
        let mut header = [0u8; HEADER as usize];
        let ok = r.file.read_exact_at(&mut header, 0).is_ok()
            && &header[0..8] == MAGIC
            && u32::from_le_bytes(header[8..12].try_into().unwrap()) == VERSION
            && u32::from_le_bytes(header[12..16].try_into().unwrap()) as u64 == block_size
            && u64::from_le_bytes(header[16..24].try_into().unwrap()) == size;
        if !ok {
            r.file.set_len(0)?;
            header = [0u8; HEADER as usize];
            header[0..8].copy_from_slice(MAGIC);
            header[8..12].copy_from_slice(&VERSION.to_le_bytes());
            header[12..16].copy_from_slice(&(block_size as u32).to_le_bytes());
            header[16..24].copy_from_slice(&size.to_le_bytes());
            r.file.write_all_at(&header, 0)?;
            r.file.set_len(HEADER + blocks * 8)?;
            return Ok(r);
        }
        r.flags.store(u32::from_le_bytes(header[24..28].try_into().unwrap()), Ordering::Release);
        // Read slots in bounded chunks (a 1 TiB blob has 256 Ki slots = 2 MiB).
        let mut buf = vec![0u8; 64 * 1024];
        let mut i = 0u64;
        while i < blocks {
            let n = ((blocks - i) * 8).min(buf.len() as u64) as usize;
            let got = read_up_to(&r.file, &mut buf[..n], HEADER + i * 8)?;
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
        Ok(r)
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
        (0..self.blocks).filter(|&i| self.is_resident(i)).map(|i| self.block_range(i).end - self.block_range(i).start).sum()
    }

    pub fn is_complete(&self) -> bool {
        self.resident_blocks() == self.blocks
    }

    /// Every block resident and checked in this process: safe to hand the file to the
    /// kernel for passthrough reads.
    pub fn is_fully_verified(&self) -> bool {
        self.verified.count() == self.blocks
    }

    /// Records block `i` as resident with checksum `crc`. Call only after the block's
    /// data write has returned.
    pub fn mark_resident(&self, i: u64, crc: u32) -> io::Result<()> {
        let mut slot = [0u8; 8];
        slot[0..4].copy_from_slice(&crc.to_le_bytes());
        slot[4..8].copy_from_slice(&MARKER.to_le_bytes());
        self.file.write_all_at(&slot, HEADER + i * 8)?;
        self.crcs[i as usize].store(crc, Ordering::Release);
        self.resident.set(i, true);
        self.verified.set(i, true);
        Ok(())
    }

    /// A block read from disk matched its checksum.
    pub fn mark_verified(&self, i: u64) {
        self.verified.set(i, true);
    }

    /// Forget block `i` (its bytes failed verification).
    pub fn drop_block(&self, i: u64) -> io::Result<()> {
        self.resident.set(i, false);
        self.verified.set(i, false);
        self.file.write_all_at(&[0u8; 8], HEADER + i * 8)
    }

    pub fn flags(&self) -> u32 {
        self.flags.load(Ordering::Acquire)
    }

    pub fn set_flag(&self, flag: u32) -> io::Result<()> {
        let f = self.flags.fetch_or(flag, Ordering::AcqRel) | flag;
        self.file.write_all_at(&f.to_le_bytes(), 24)
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
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

    #[test]
    fn slots_survive_reopen_and_torn_slots_are_not_resident() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        let r = Residency::open(&p, 4, 10).unwrap();
        assert_eq!(r.blocks(), 3);
        assert_eq!(r.block_range(2), 8..10);
        r.mark_resident(0, 7).unwrap();
        r.mark_resident(2, 9).unwrap();
        drop(r);
        // Simulate a slot torn by a crash: crc written, marker not.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&5u32.to_le_bytes(), HEADER + 8).unwrap();
        let r = Residency::open(&p, 4, 10).unwrap();
        assert!(r.is_resident(0) && !r.is_resident(1) && r.is_resident(2));
        assert_eq!(r.crc(2), 9);
        assert!(!r.is_verified(0), "blocks from disk are verified again in a new process");
        assert_eq!(r.resident_bytes(), 4 + 2);
        // Another geometry resets the map.
        let r = Residency::open(&p, 8, 10).unwrap();
        assert_eq!(r.resident_blocks(), 0);
    }
}

//! MD5 of many independent byte strings at once, one per lane of a SIMD register.
//!
//! Why: an upload hashes every byte twice, into its block's MD5 (Put Block's
//! transactional checksum) and into the whole file's (the blob's `Content-MD5`, which
//! manifests and restores check), and one MD5 is a serial chain: about 0.7 GB/s on one
//! core whatever the machine. Measured on a 2-core node, the sync spent nearly all its
//! CPU there (7.6 s for a 2 GiB step, where the lake's client needed 0.8 s). Separate
//! strings do not depend on each other, so a 256-bit register advances 8 of them with
//! one instruction each step, at close to the cost of one.
//!
//! How: one thread per process (`tidepool-md5`, started on first use, asleep when
//! there is nothing to hash) fills [`LANES`] lanes with jobs — "advance this state over
//! these bytes" — and runs the vector compression over all of them, [`CHUNK_BLOCKS`]
//! 64-byte blocks at a time; a lane whose job ends takes the next queued one, so jobs of
//! any lengths share the lanes. Jobs continuing a stream ([`update`], a whole file's
//! MD5: each step waits for the one before) go ahead of one-off ones ([`digest`], a
//! block's), which are not on a chain. With one job in the lanes the scalar compression
//! runs instead (it is faster for one string), and without AVX2 there is no thread at
//! all: each job is hashed by the scalar code on the blocking pool, as before.
//!
//! Invariants: the results are RFC 1321 MD5 (tests compare every kernel and the thread
//! with the `md-5` crate on many lengths, splits and mixes of jobs); a job's bytes are
//! dropped before its answer is sent, so memory accounted to them (the upload's budget
//! rides on the buffer) is free when the caller resumes; nothing here blocks the async
//! runtime's threads.

use std::collections::VecDeque;
use std::sync::OnceLock;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use tokio::sync::oneshot;

/// Strings hashed side by side: 8 lanes of 32 bits in a 256-bit register.
pub(super) const LANES: usize = 8;

/// Blocks (of 64 bytes) the lanes advance between looks at the queue: 64 KiB, a few
/// tens of microseconds, so a job that arrives while a lane is idle waits about that
/// long to take it.
const CHUNK_BLOCKS: usize = 1024;

/// The 64 steps of RFC 1321 as `$step!(round, a, b, c, d, message word, shift,
/// constant)`, rotating the roles of the four state words as the RFC does; the
/// constants are `floor(|sin(i + 1)| × 2^32)` (a test recomputes them).
macro_rules! md5_steps {
    ($step:ident, $a:ident, $b:ident, $c:ident, $d:ident) => {
        $step!(ff, $a, $b, $c, $d, 0, 7, 0xd76aa478u32);
        $step!(ff, $d, $a, $b, $c, 1, 12, 0xe8c7b756u32);
        $step!(ff, $c, $d, $a, $b, 2, 17, 0x242070dbu32);
        $step!(ff, $b, $c, $d, $a, 3, 22, 0xc1bdceeeu32);
        $step!(ff, $a, $b, $c, $d, 4, 7, 0xf57c0fafu32);
        $step!(ff, $d, $a, $b, $c, 5, 12, 0x4787c62au32);
        $step!(ff, $c, $d, $a, $b, 6, 17, 0xa8304613u32);
        $step!(ff, $b, $c, $d, $a, 7, 22, 0xfd469501u32);
        $step!(ff, $a, $b, $c, $d, 8, 7, 0x698098d8u32);
        $step!(ff, $d, $a, $b, $c, 9, 12, 0x8b44f7afu32);
        $step!(ff, $c, $d, $a, $b, 10, 17, 0xffff5bb1u32);
        $step!(ff, $b, $c, $d, $a, 11, 22, 0x895cd7beu32);
        $step!(ff, $a, $b, $c, $d, 12, 7, 0x6b901122u32);
        $step!(ff, $d, $a, $b, $c, 13, 12, 0xfd987193u32);
        $step!(ff, $c, $d, $a, $b, 14, 17, 0xa679438eu32);
        $step!(ff, $b, $c, $d, $a, 15, 22, 0x49b40821u32);
        $step!(gg, $a, $b, $c, $d, 1, 5, 0xf61e2562u32);
        $step!(gg, $d, $a, $b, $c, 6, 9, 0xc040b340u32);
        $step!(gg, $c, $d, $a, $b, 11, 14, 0x265e5a51u32);
        $step!(gg, $b, $c, $d, $a, 0, 20, 0xe9b6c7aau32);
        $step!(gg, $a, $b, $c, $d, 5, 5, 0xd62f105du32);
        $step!(gg, $d, $a, $b, $c, 10, 9, 0x02441453u32);
        $step!(gg, $c, $d, $a, $b, 15, 14, 0xd8a1e681u32);
        $step!(gg, $b, $c, $d, $a, 4, 20, 0xe7d3fbc8u32);
        $step!(gg, $a, $b, $c, $d, 9, 5, 0x21e1cde6u32);
        $step!(gg, $d, $a, $b, $c, 14, 9, 0xc33707d6u32);
        $step!(gg, $c, $d, $a, $b, 3, 14, 0xf4d50d87u32);
        $step!(gg, $b, $c, $d, $a, 8, 20, 0x455a14edu32);
        $step!(gg, $a, $b, $c, $d, 13, 5, 0xa9e3e905u32);
        $step!(gg, $d, $a, $b, $c, 2, 9, 0xfcefa3f8u32);
        $step!(gg, $c, $d, $a, $b, 7, 14, 0x676f02d9u32);
        $step!(gg, $b, $c, $d, $a, 12, 20, 0x8d2a4c8au32);
        $step!(hh, $a, $b, $c, $d, 5, 4, 0xfffa3942u32);
        $step!(hh, $d, $a, $b, $c, 8, 11, 0x8771f681u32);
        $step!(hh, $c, $d, $a, $b, 11, 16, 0x6d9d6122u32);
        $step!(hh, $b, $c, $d, $a, 14, 23, 0xfde5380cu32);
        $step!(hh, $a, $b, $c, $d, 1, 4, 0xa4beea44u32);
        $step!(hh, $d, $a, $b, $c, 4, 11, 0x4bdecfa9u32);
        $step!(hh, $c, $d, $a, $b, 7, 16, 0xf6bb4b60u32);
        $step!(hh, $b, $c, $d, $a, 10, 23, 0xbebfbc70u32);
        $step!(hh, $a, $b, $c, $d, 13, 4, 0x289b7ec6u32);
        $step!(hh, $d, $a, $b, $c, 0, 11, 0xeaa127fau32);
        $step!(hh, $c, $d, $a, $b, 3, 16, 0xd4ef3085u32);
        $step!(hh, $b, $c, $d, $a, 6, 23, 0x04881d05u32);
        $step!(hh, $a, $b, $c, $d, 9, 4, 0xd9d4d039u32);
        $step!(hh, $d, $a, $b, $c, 12, 11, 0xe6db99e5u32);
        $step!(hh, $c, $d, $a, $b, 15, 16, 0x1fa27cf8u32);
        $step!(hh, $b, $c, $d, $a, 2, 23, 0xc4ac5665u32);
        $step!(ii, $a, $b, $c, $d, 0, 6, 0xf4292244u32);
        $step!(ii, $d, $a, $b, $c, 7, 10, 0x432aff97u32);
        $step!(ii, $c, $d, $a, $b, 14, 15, 0xab9423a7u32);
        $step!(ii, $b, $c, $d, $a, 5, 21, 0xfc93a039u32);
        $step!(ii, $a, $b, $c, $d, 12, 6, 0x655b59c3u32);
        $step!(ii, $d, $a, $b, $c, 3, 10, 0x8f0ccc92u32);
        $step!(ii, $c, $d, $a, $b, 10, 15, 0xffeff47du32);
        $step!(ii, $b, $c, $d, $a, 1, 21, 0x85845dd1u32);
        $step!(ii, $a, $b, $c, $d, 8, 6, 0x6fa87e4fu32);
        $step!(ii, $d, $a, $b, $c, 15, 10, 0xfe2ce6e0u32);
        $step!(ii, $c, $d, $a, $b, 6, 15, 0xa3014314u32);
        $step!(ii, $b, $c, $d, $a, 13, 21, 0x4e0811a1u32);
        $step!(ii, $a, $b, $c, $d, 4, 6, 0xf7537e82u32);
        $step!(ii, $d, $a, $b, $c, 11, 10, 0xbd3af235u32);
        $step!(ii, $c, $d, $a, $b, 2, 15, 0x2ad7d2bbu32);
        $step!(ii, $b, $c, $d, $a, 9, 21, 0xeb86d391u32);
    };
}

const INIT: [u32; 4] = [0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476];

/// One 64-byte block into one state, in plain integer code.
fn compress(h: &mut [u32; 4], block: &[u8]) {
    debug_assert_eq!(block.len(), 64);
    let mut w = [0u32; 16];
    for (w, b) in w.iter_mut().zip(block.chunks_exact(4)) {
        *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    let [mut a, mut b, mut c, mut d] = *h;
    macro_rules! ff {
        ($b:expr, $c:expr, $d:expr) => {
            $d ^ ($b & ($c ^ $d))
        };
    }
    macro_rules! gg {
        ($b:expr, $c:expr, $d:expr) => {
            $c ^ ($d & ($b ^ $c))
        };
    }
    macro_rules! hh {
        ($b:expr, $c:expr, $d:expr) => {
            $b ^ $c ^ $d
        };
    }
    macro_rules! ii {
        ($b:expr, $c:expr, $d:expr) => {
            $c ^ ($b | !$d)
        };
    }
    macro_rules! step {
        ($f:ident, $a:ident, $b:ident, $c:ident, $d:ident, $k:literal, $s:literal, $t:literal) => {
            $a = $b.wrapping_add(
                $a.wrapping_add($f!($b, $c, $d))
                    .wrapping_add(w[$k])
                    .wrapping_add($t)
                    .rotate_left($s),
            );
        };
    }
    md5_steps!(step, a, b, c, d);
    for (h, v) in h.iter_mut().zip([a, b, c, d]) {
        *h = h.wrapping_add(v);
    }
}

/// An MD5 in progress: the chaining state, the bytes absorbed, and the last partial
/// block (so a stream may be fed in pieces of any length).
#[derive(Clone, Debug)]
pub(super) struct Md5State {
    h: [u32; 4],
    len: u64,
    buf: [u8; 64],
    held: usize,
}

impl Default for Md5State {
    fn default() -> Self {
        Md5State {
            h: INIT,
            len: 0,
            buf: [0; 64],
            held: 0,
        }
    }
}

impl Md5State {
    /// Counts `data` as absorbed and takes its head into the partial block (compressing
    /// the block when it fills); returns where `data`'s whole 64-byte blocks start. When
    /// a partial block is still held afterwards, all of `data` went into it.
    fn begin(&mut self, data: &[u8]) -> usize {
        self.len += data.len() as u64;
        if self.held == 0 {
            return 0;
        }
        let take = (64 - self.held).min(data.len());
        self.buf[self.held..self.held + take].copy_from_slice(&data[..take]);
        self.held += take;
        if self.held == 64 {
            compress(&mut self.h, &self.buf);
            self.held = 0;
        }
        take
    }

    /// Keeps the tail after the whole blocks (shorter than one block).
    fn end(&mut self, tail: &[u8]) {
        debug_assert!(tail.is_empty() || self.held == 0);
        self.buf[self.held..self.held + tail.len()].copy_from_slice(tail);
        self.held += tail.len();
    }

    /// Absorbs `data` on the calling thread, with the scalar code.
    pub(super) fn update_here(&mut self, data: &[u8]) {
        let start = self.begin(data);
        let body = &data[start..];
        let whole = body.len() / 64 * 64;
        for block in body[..whole].chunks_exact(64) {
            compress(&mut self.h, block);
        }
        self.end(&body[whole..]);
    }

    /// The digest: RFC 1321 padding and the length in bits.
    pub(super) fn finalize(mut self) -> [u8; 16] {
        let bits = self.len.wrapping_mul(8);
        self.buf[self.held] = 0x80;
        self.buf[self.held + 1..].fill(0);
        if self.held >= 56 {
            compress(&mut self.h, &self.buf);
            self.buf.fill(0);
        }
        self.buf[56..].copy_from_slice(&bits.to_le_bytes());
        compress(&mut self.h, &self.buf);
        let mut out = [0u8; 16];
        for (o, h) in out.chunks_exact_mut(4).zip(self.h) {
            o.copy_from_slice(&h.to_le_bytes());
        }
        out
    }
}

/// Advances `state` over `data` and returns it: the next piece of a stream. Streams go
/// ahead of [`digest`]s in the queue (each of their pieces waits for the one before).
pub(super) async fn update(state: Md5State, data: Bytes) -> Md5State {
    run(state, data, true).await
}

/// The MD5 of `data` alone.
pub(super) async fn digest(data: Bytes) -> [u8; 16] {
    run(Md5State::default(), data, false).await.finalize()
}

async fn run(mut state: Md5State, data: Bytes, stream: bool) -> Md5State {
    match hasher() {
        Some(h) => {
            let (tx, rx) = oneshot::channel();
            h.submit(Job::new(state, data, tx), stream);
            rx.await.expect("the MD5 thread answers every job")
        }
        None => tokio::task::spawn_blocking(move || {
            state.update_here(&data);
            state
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())),
    }
}

/// Advances the states of [`LANES`] strings by `n` blocks each: lane `j` reads its
/// blocks at `ptrs[j]`, `ptrs[j] + strides[j]`, … (a stride of 0 repeats one block,
/// for a lane without a job).
///
/// # Safety
/// The CPU has the kernel's features (as [`kernel`] checked), and every `ptrs[j]` is
/// valid for reads of `(n - 1) * strides[j] + 64` bytes.
type Kernel = unsafe fn(&mut [[u32; 4]; LANES], &[*const u8; LANES], &[usize; LANES], usize);

/// The fastest vector kernel this CPU runs, if any.
fn kernel() -> Option<Kernel> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            return Some(x86::avx512::compress as Kernel);
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return Some(x86::avx2::compress as Kernel);
        }
    }
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// Words `8 × half .. 8 × half + 8` of the current block of every lane, one vector
    /// per word: an 8 × 8 transpose of 32-bit words.
    macro_rules! load_words {
        ($w:ident, $ptrs:ident, $offs:ident, $half:literal) => {{
            macro_rules! row {
                ($j:literal) => {
                    // SAFETY: the caller guarantees every lane's block is readable.
                    unsafe {
                        _mm256_loadu_si256($ptrs[$j].add($offs[$j] + 32 * $half) as *const __m256i)
                    }
                };
            }
            let (r0, r1, r2, r3) = (row!(0), row!(1), row!(2), row!(3));
            let (r4, r5, r6, r7) = (row!(4), row!(5), row!(6), row!(7));
            let t0 = _mm256_unpacklo_epi32(r0, r1);
            let t1 = _mm256_unpackhi_epi32(r0, r1);
            let t2 = _mm256_unpacklo_epi32(r2, r3);
            let t3 = _mm256_unpackhi_epi32(r2, r3);
            let t4 = _mm256_unpacklo_epi32(r4, r5);
            let t5 = _mm256_unpackhi_epi32(r4, r5);
            let t6 = _mm256_unpacklo_epi32(r6, r7);
            let t7 = _mm256_unpackhi_epi32(r6, r7);
            let u0 = _mm256_unpacklo_epi64(t0, t2);
            let u1 = _mm256_unpackhi_epi64(t0, t2);
            let u2 = _mm256_unpacklo_epi64(t1, t3);
            let u3 = _mm256_unpackhi_epi64(t1, t3);
            let u4 = _mm256_unpacklo_epi64(t4, t6);
            let u5 = _mm256_unpackhi_epi64(t4, t6);
            let u6 = _mm256_unpacklo_epi64(t5, t7);
            let u7 = _mm256_unpackhi_epi64(t5, t7);
            $w[8 * $half] = _mm256_permute2x128_si256(u0, u4, 0x20);
            $w[8 * $half + 1] = _mm256_permute2x128_si256(u1, u5, 0x20);
            $w[8 * $half + 2] = _mm256_permute2x128_si256(u2, u6, 0x20);
            $w[8 * $half + 3] = _mm256_permute2x128_si256(u3, u7, 0x20);
            $w[8 * $half + 4] = _mm256_permute2x128_si256(u0, u4, 0x31);
            $w[8 * $half + 5] = _mm256_permute2x128_si256(u1, u5, 0x31);
            $w[8 * $half + 6] = _mm256_permute2x128_si256(u2, u6, 0x31);
            $w[8 * $half + 7] = _mm256_permute2x128_si256(u3, u7, 0x31);
        }};
    }

    /// A kernel: the lanes' states in four vectors, 64 steps per block, with the round
    /// functions `ff`..`ii` and `rotl` of the module it is expanded in.
    macro_rules! kernel {
        ($features:literal) => {
            #[target_feature(enable = $features)]
            pub(in super::super) unsafe fn compress(
                h: &mut [[u32; 4]; LANES],
                ptrs: &[*const u8; LANES],
                strides: &[usize; LANES],
                n: usize,
            ) {
                let mut v = [[0u32; LANES]; 4];
                for (j, h) in h.iter().enumerate() {
                    for k in 0..4 {
                        v[k][j] = h[k];
                    }
                }
                let [mut a, mut b, mut c, mut d] = v.map(|v| {
                    // SAFETY: an unaligned load of one array of 8 u32 (32 bytes).
                    unsafe { _mm256_loadu_si256(v.as_ptr() as *const __m256i) }
                });
                let mut w = [_mm256_setzero_si256(); 16];
                let mut offs = [0usize; LANES];
                for _ in 0..n {
                    load_words!(w, ptrs, offs, 0);
                    load_words!(w, ptrs, offs, 1);
                    let (a0, b0, c0, d0) = (a, b, c, d);
                    macro_rules! step {
                        ($f:ident, $a:ident, $b:ident, $c:ident, $d:ident, $k:literal, $s:literal, $t:literal) => {
                            let x = _mm256_add_epi32(w[$k], _mm256_set1_epi32($t as i32));
                            let x = _mm256_add_epi32(_mm256_add_epi32($a, x), $f!($b, $c, $d));
                            $a = _mm256_add_epi32($b, rotl!(x, $s));
                        };
                    }
                    md5_steps!(step, a, b, c, d);
                    a = _mm256_add_epi32(a, a0);
                    b = _mm256_add_epi32(b, b0);
                    c = _mm256_add_epi32(c, c0);
                    d = _mm256_add_epi32(d, d0);
                    for (o, s) in offs.iter_mut().zip(strides) {
                        *o += s;
                    }
                }
                for (k, x) in [a, b, c, d].into_iter().enumerate() {
                    // SAFETY: an unaligned store into an array of 8 u32.
                    unsafe { _mm256_storeu_si256(v[k].as_mut_ptr() as *mut __m256i, x) };
                }
                for (j, h) in h.iter_mut().enumerate() {
                    for k in 0..4 {
                        h[k] = v[k][j];
                    }
                }
            }
        };
    }

    /// AVX2: the round functions from 2–3 logic instructions, rotation from two shifts.
    pub(super) mod avx2 {
        use std::arch::x86_64::*;

        use super::super::LANES;

        macro_rules! ff {
            ($b:expr, $c:expr, $d:expr) => {
                _mm256_xor_si256($d, _mm256_and_si256($b, _mm256_xor_si256($c, $d)))
            };
        }
        macro_rules! gg {
            ($b:expr, $c:expr, $d:expr) => {
                _mm256_xor_si256($c, _mm256_and_si256($d, _mm256_xor_si256($b, $c)))
            };
        }
        macro_rules! hh {
            ($b:expr, $c:expr, $d:expr) => {
                _mm256_xor_si256(_mm256_xor_si256($b, $c), $d)
            };
        }
        macro_rules! ii {
            ($b:expr, $c:expr, $d:expr) => {
                _mm256_xor_si256(
                    $c,
                    _mm256_or_si256($b, _mm256_xor_si256($d, _mm256_set1_epi32(-1))),
                )
            };
        }
        macro_rules! rotl {
            ($x:expr, $s:literal) => {
                _mm256_or_si256(
                    _mm256_slli_epi32::<$s>($x),
                    _mm256_srli_epi32::<{ 32 - $s }>($x),
                )
            };
        }
        kernel!("avx2");
    }

    /// AVX-512VL on 256-bit registers: each round function is one ternary-logic
    /// instruction (truth tables with b, c, d as 0xf0, 0xcc, 0xaa) and the rotation one
    /// instruction, which shortens every step's dependency chain.
    pub(super) mod avx512 {
        use std::arch::x86_64::*;

        use super::super::LANES;

        macro_rules! ff {
            ($b:expr, $c:expr, $d:expr) => {
                _mm256_ternarylogic_epi32::<0xca>($b, $c, $d)
            };
        }
        macro_rules! gg {
            ($b:expr, $c:expr, $d:expr) => {
                _mm256_ternarylogic_epi32::<0xe4>($b, $c, $d)
            };
        }
        macro_rules! hh {
            ($b:expr, $c:expr, $d:expr) => {
                _mm256_ternarylogic_epi32::<0x96>($b, $c, $d)
            };
        }
        macro_rules! ii {
            ($b:expr, $c:expr, $d:expr) => {
                _mm256_ternarylogic_epi32::<0x39>($b, $c, $d)
            };
        }
        macro_rules! rotl {
            ($x:expr, $s:literal) => {
                _mm256_rol_epi32::<$s>($x)
            };
        }
        kernel!("avx2,avx512f,avx512vl");
    }
}

/// A piece of hashing: `data[pos..end]` (whole blocks) still to go into `state`.
struct Job {
    state: Md5State,
    data: Bytes,
    pos: usize,
    end: usize,
    reply: oneshot::Sender<Md5State>,
}

impl Job {
    fn new(mut state: Md5State, data: Bytes, reply: oneshot::Sender<Md5State>) -> Job {
        let pos = state.begin(&data);
        let end = pos + (data.len() - pos) / 64 * 64;
        Job {
            state,
            data,
            pos,
            end,
            reply,
        }
    }

    fn blocks_left(&self) -> usize {
        (self.end - self.pos) / 64
    }

    /// Keeps the tail, lets go of the bytes, answers.
    fn finish(self) {
        let Job {
            mut state,
            data,
            end,
            reply,
            ..
        } = self;
        state.end(&data[end..]);
        drop(data);
        // The caller may have stopped waiting (its upload failed): nothing to do.
        let _ = reply.send(state);
    }
}

/// The queue of the `tidepool-md5` thread.
struct Hasher {
    queue: Mutex<Queue>,
    wake: Condvar,
    kernel: Kernel,
}

#[derive(Default)]
struct Queue {
    streams: VecDeque<Job>,
    oneoffs: VecDeque<Job>,
}

impl Hasher {
    fn submit(&self, job: Job, stream: bool) {
        let mut q = self.queue.lock();
        if stream {
            q.streams.push_back(job);
        } else {
            q.oneoffs.push_back(job);
        }
        drop(q);
        self.wake.notify_one();
    }

    /// The thread's loop: never returns.
    fn serve(&self) {
        let mut lanes: [Option<Job>; LANES] = Default::default();
        loop {
            {
                let mut q = self.queue.lock();
                loop {
                    for lane in lanes.iter_mut().filter(|l| l.is_none()) {
                        *lane = q.streams.pop_front().or_else(|| q.oneoffs.pop_front());
                    }
                    if lanes.iter().any(Option::is_some) {
                        break;
                    }
                    self.wake.wait(&mut q);
                }
            }
            self.advance(&mut lanes);
        }
    }

    /// Runs the lanes' jobs by up to [`CHUNK_BLOCKS`] blocks and answers those done.
    fn advance(&self, lanes: &mut [Option<Job>; LANES]) {
        let active = lanes
            .iter()
            .flatten()
            .filter(|j| j.blocks_left() > 0)
            .count();
        let n = lanes
            .iter()
            .flatten()
            .map(Job::blocks_left)
            .filter(|&n| n > 0)
            .min()
            .unwrap_or(0)
            .min(CHUNK_BLOCKS);
        if active == 1 {
            let job = lanes.iter_mut().flatten().find(|j| j.blocks_left() > 0);
            let job = job.expect("one active lane");
            let n = job.blocks_left().min(CHUNK_BLOCKS);
            for block in job.data[job.pos..job.pos + 64 * n].chunks_exact(64) {
                compress(&mut job.state.h, block);
            }
            job.pos += 64 * n;
        } else if active > 1 {
            static IDLE: [u8; 64] = [0; 64];
            let mut h = [INIT; LANES];
            let mut ptrs = [IDLE.as_ptr(); LANES];
            let mut strides = [0usize; LANES];
            for (j, job) in lanes.iter().enumerate() {
                if let Some(job) = job.as_ref().filter(|j| j.blocks_left() > 0) {
                    h[j] = job.state.h;
                    ptrs[j] = job.data[job.pos..].as_ptr();
                    strides[j] = 64;
                }
            }
            // SAFETY: `kernel` came from `kernel()`, which checked the CPU; every active
            // lane has at least `n` whole blocks from `pos` (n ≤ its blocks left), and an
            // idle lane reads IDLE again and again (stride 0).
            unsafe { (self.kernel)(&mut h, &ptrs, &strides, n) };
            for (j, lane) in lanes.iter_mut().enumerate() {
                if let Some(job) = lane.as_mut().filter(|j| j.blocks_left() > 0) {
                    job.state.h = h[j];
                    job.pos += 64 * n;
                }
            }
        }
        for lane in lanes.iter_mut() {
            if lane.as_ref().is_some_and(|j| j.blocks_left() == 0) {
                lane.take().expect("checked").finish();
            }
        }
    }
}

/// The process's hasher, started on first use; `None` without a vector kernel (or if
/// the thread could not start), and jobs are then hashed on the blocking pool.
fn hasher() -> Option<&'static Hasher> {
    static HASHER: OnceLock<Option<&'static Hasher>> = OnceLock::new();
    *HASHER.get_or_init(|| {
        let kernel = kernel()?;
        let hasher: &'static Hasher = Box::leak(Box::new(Hasher {
            queue: Mutex::default(),
            wake: Condvar::new(),
            kernel,
        }));
        match std::thread::Builder::new()
            .name("tidepool-md5".into())
            .spawn(move || hasher.serve())
        {
            Ok(_) => Some(hasher),
            Err(e) => {
                tracing::warn!(error = %e, "no MD5 thread; hashing on the blocking pool");
                None
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use md5::{Digest as _, Md5};

    fn data(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn reference(d: &[u8]) -> [u8; 16] {
        Md5::digest(d).into()
    }

    #[test]
    fn the_step_constants_are_the_rfcs() {
        let mut got = Vec::new();
        macro_rules! collect {
            ($f:ident, $a:ident, $b:ident, $c:ident, $d:ident, $k:literal, $s:literal, $t:literal) => {
                got.push($t);
            };
        }
        md5_steps!(collect, a, b, c, d);
        let want: Vec<u32> = (1..=64)
            .map(|i| ((i as f64).sin().abs() * 4_294_967_296.0) as u32)
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn the_scalar_code_is_md5_whatever_the_pieces() {
        for len in [
            0, 1, 55, 56, 63, 64, 65, 119, 120, 127, 128, 1000, 4096, 100_003,
        ] {
            let d = data(len, len as u64);
            let mut s = Md5State::default();
            s.update_here(&d);
            assert_eq!(s.finalize(), reference(&d), "{len} bytes at once");
            for cut in [1, 7, 63, 64, 65, 200] {
                let mut s = Md5State::default();
                for piece in d.chunks(cut) {
                    s.update_here(piece);
                }
                assert_eq!(s.finalize(), reference(&d), "{len} bytes in {cut}");
            }
        }
    }

    #[test]
    fn every_vector_kernel_matches_the_scalar_code() {
        let mut kernels: Vec<(&str, Kernel)> = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                kernels.push(("avx2", x86::avx2::compress as Kernel));
            }
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
            {
                kernels.push(("avx512", x86::avx512::compress as Kernel));
            }
        }
        if kernels.is_empty() {
            eprintln!("no vector kernel on this CPU: only the scalar code is tested");
        }
        let bufs: Vec<Vec<u8>> = (0..LANES).map(|j| data(64 * 37, 7 + j as u64)).collect();
        for (name, k) in kernels {
            // Every lane active from its own start state; then some idle (stride 0).
            for idle in [0usize, 0b1010_0110] {
                let start: [[u32; 4]; LANES] = std::array::from_fn(|j| {
                    let mut h = INIT;
                    h[j % 4] ^= j as u32 * 0x0101_0101;
                    h
                });
                let mut h = start;
                let ptrs = std::array::from_fn(|j| bufs[j].as_ptr());
                let strides = std::array::from_fn(|j| if idle >> j & 1 == 1 { 0 } else { 64 });
                // SAFETY: the kernel's features were detected; 37 blocks in each buffer.
                unsafe { k(&mut h, &ptrs, &strides, 37) };
                for j in 0..LANES {
                    let mut want = start[j];
                    for i in 0..37 {
                        let at = i * strides[j];
                        compress(&mut want, &bufs[j][at..at + 64]);
                    }
                    assert_eq!(h[j], want, "{name}, lane {j}, idle mask {idle:#b}");
                }
            }
        }
    }

    /// Jobs of every length, streams fed in uneven pieces and one-offs, all at once:
    /// through the thread (vector lanes) where the CPU has a kernel, the blocking pool
    /// otherwise.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_hasher_is_md5_for_any_mix_of_jobs() {
        let oneoffs = (0..40).map(|i| {
            let d = data(
                [0, 1, 63, 64, 65, 4096, 70_001, 1 << 20][i % 8] + i,
                i as u64,
            );
            async move { assert_eq!(digest(Bytes::from(d.clone())).await, reference(&d)) }
        });
        let streams = (0..12).map(|i| {
            let d = data(300_000 + 77 * i, 100 + i as u64);
            async move {
                let mut s = Md5State::default();
                let mut at = 0;
                for piece in [1, 64, 1000, 65_536, 3, 128 * 1024].iter().cycle() {
                    if at == d.len() {
                        break;
                    }
                    let end = (at + piece).min(d.len());
                    s = update(s, Bytes::copy_from_slice(&d[at..end])).await;
                    at = end;
                }
                assert_eq!(s.finalize(), reference(&d), "stream {i}");
            }
        });
        futures::join!(
            futures::future::join_all(oneoffs),
            futures::future::join_all(streams)
        );
    }
}

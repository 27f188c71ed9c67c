//! PyTorch's CUDA random draws, replayed on the host, so that a case draws the very sequence
//! lengths and block tables that vLLM's `benchmark_trtllm_decode_attention.py` draws for it (and
//! that FlashInfer's figures in issue 7 were measured on).
//!
//! The script seeds with `torch.manual_seed(seed)` on the default device `cuda`. PyTorch's CUDA
//! generator is counter-based: Philox4x32-10 keyed by the seed, each draw a kernel whose thread
//! `i` starts at counter `(offset / 4, 0)` of subsequence `i` (curand's `curand_init(seed, i,
//! offset)`), and the generator's offset moving on by a fixed increment per draw. A draw of `n`
//! elements runs `min(SMs x max threads per SM / 256, ceil(n / 256))` blocks of 256 threads, each
//! thread taking four values per `curand4` call in a grid-stride loop; the increment is four
//! counters per loop round. So a draw depends on the seed, on every earlier draw's size and on the
//! GPU's SM count. Decodebench replays it for [`REFERENCE_SM_COUNT`] SMs (the H100 SXM of the
//! script's and FlashInfer's figures; the H200 has as many) on every machine, so that every card
//! of a fleet times the same work.
//!
//! Checked against PyTorch 2.11 on an H200 (132 SMs): the lengths and the SHA-256 of the block
//! tables of 140 cases (`kernels/tests/fixtures/torch_draws.json`, written by
//! `bench/gpu/torch_draws.py`).

/// SMs of the GPU whose draws are replayed: the H100 SXM (and H200) of the reference figures.
pub const REFERENCE_SM_COUNT: u64 = 132;
/// Maximum resident threads per SM of that GPU (Hopper, as Ampere and Ada).
pub const REFERENCE_THREADS_PER_SM: u64 = 2048;

/// Threads per block of PyTorch's distribution kernels.
const BLOCK: u64 = 256;
/// Values per thread per loop round (`curand4`, and `curand_normal4` for float types).
const UNROLL: u64 = 4;

const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds (Salmon et al., as curand implements it).
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        let p0 = u64::from(PHILOX_M0) * u64::from(c[0]);
        let p1 = u64::from(PHILOX_M1) * u64::from(c[2]);
        c = [
            (p1 >> 32) as u32 ^ c[1] ^ k[0],
            p1 as u32,
            (p0 >> 32) as u32 ^ c[3] ^ k[1],
            p0 as u32,
        ];
        if round < 9 {
            k = [k[0].wrapping_add(PHILOX_W0), k[1].wrapping_add(PHILOX_W1)];
        }
    }
    c
}

/// PyTorch's CUDA generator after `torch.manual_seed(seed)`, on a GPU of `sm_count` SMs.
#[derive(Debug, Clone)]
pub struct TorchCudaRng {
    key: [u32; 2],
    /// The generator's Philox offset (`philox_offset_per_thread`), a multiple of 4.
    offset: u64,
    /// Blocks a draw runs at most: SMs x (threads per SM / 256).
    max_grid: u64,
}

impl TorchCudaRng {
    /// `torch.manual_seed(seed)` on the reference GPU ([`REFERENCE_SM_COUNT`] SMs).
    pub fn manual_seed(seed: u64) -> TorchCudaRng {
        TorchCudaRng::with_sms(seed, REFERENCE_SM_COUNT, REFERENCE_THREADS_PER_SM)
    }

    /// `torch.manual_seed(seed)` on a GPU of `sm_count` SMs of `threads_per_sm` threads.
    pub fn with_sms(seed: u64, sm_count: u64, threads_per_sm: u64) -> TorchCudaRng {
        TorchCudaRng {
            key: [seed as u32, (seed >> 32) as u32],
            offset: 0,
            max_grid: (sm_count * (threads_per_sm / BLOCK)).max(1),
        }
    }

    /// Blocks of a draw of `numel` elements.
    fn grid(&self, numel: u64) -> u64 {
        numel.div_ceil(BLOCK).clamp(1, self.max_grid)
    }

    /// Moves the offset past a draw of `numel` elements and returns the draw's own offset. An
    /// empty draw launches nothing and leaves the offset where it was, as in PyTorch.
    fn take(&mut self, numel: u64) -> u64 {
        let at = self.offset;
        if numel > 0 {
            let rounds = (numel - 1) / (BLOCK * self.grid(numel) * UNROLL) + 1;
            self.offset += rounds * 4;
        }
        at
    }

    /// A `torch.randn` (or any `normal_`) of `numel` bf16, f16 or f32 elements: only its effect
    /// on the generator, since decodebench draws its own values.
    pub fn skip_normal(&mut self, numel: u64) {
        self.take(numel);
    }

    /// A `torch.randint(low, high, (numel,), dtype=torch.int32)` (a range below 2^32), whose
    /// values are skipped.
    pub fn skip_randint(&mut self, numel: u64) {
        self.take(numel);
    }

    /// `torch.randint(low, high, (numel,), dtype=torch.int32)`, flattened: element `i` is
    /// `low + r % (high - low)`, `r` word `(i / step) mod 4` of the `curand4` that thread
    /// `i mod step` draws in loop round `i / (4 step)`, for `step` = 256 x the draw's blocks.
    pub fn randint_i32(&mut self, low: i32, high: i32, numel: usize) -> Vec<i32> {
        let range = (i64::from(high) - i64::from(low)).max(1) as u64;
        let step = (BLOCK * self.grid(numel as u64)) as usize;
        let offset = self.take(numel as u64);
        let mut out = vec![0i32; numel];
        for (round, chunk) in out.chunks_mut(step * UNROLL as usize).enumerate() {
            let n = offset / 4 + round as u64;
            for thread in 0..step.min(chunk.len()) {
                let ctr = [
                    n as u32,
                    (n >> 32) as u32,
                    thread as u32,
                    (thread as u64 >> 32) as u32,
                ];
                let words = philox4x32_10(ctr, self.key);
                for (word, &r) in words.iter().enumerate() {
                    if let Some(x) = chunk.get_mut(word * step + thread) {
                        *x = (i64::from(low) + (u64::from(r) % range) as i64) as i32;
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_matches_the_random123_known_answers() {
        // Known-answer vectors of Philox4x32-10 (Random123's kat_vectors).
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn a_draw_moves_the_offset_by_four_per_loop_round() {
        let mut g = TorchCudaRng::manual_seed(0);
        g.skip_normal(64 * 128); // one round: 32 blocks
        assert_eq!(g.offset, 4);
        // 256 x 1056 threads x 4 values per round: 2^21 elements take two rounds.
        g.skip_normal(256 * 64 * 128);
        assert_eq!(g.offset, 12);
        let mut small = TorchCudaRng::with_sms(0, 108, 2048);
        small.skip_normal(256 * 64 * 128); // an A100's 864 blocks: three rounds
        assert_eq!(small.offset, 12);
        small.skip_randint(0); // nothing launched
        assert_eq!(small.offset, 12);
    }

    #[test]
    fn randint_stays_in_its_range() {
        let mut g = TorchCudaRng::manual_seed(7);
        let v = g.randint_i32(5, 9, 3_000_000);
        assert_eq!(v.len(), 3_000_000);
        assert!(v.iter().all(|&x| (5..9).contains(&x)));
        // Every value of the range comes up.
        assert!((5..9).all(|x| v.contains(&x)));
    }
}

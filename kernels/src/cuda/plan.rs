//! The split-KV planner of the optimized kernel (flash-decoding): how many CTAs work on each
//! sequence, so that a small batch of long sequences still fills every SM, while a batch that
//! already fills the GPU pays no merge pass.
//!
//! The unit of work is a (sequence, kv head) pair. The tokens of all pairs are cut into chunks of
//! equal length (a multiple of the kernel's pipeline stage, at least [`MIN_CHUNK_TOKENS`]) sized
//! so that the work fills 1, 2 or 4 waves of CTAs; a sequence no longer than a chunk stays whole.
//! Which wave count is used is decided by simulating the block scheduler (CTAs go, in launch
//! order, to the first free slot) with a fixed cost per CTA, [`CTA_OVERHEAD_TOKENS`]: balancing
//! tokens matters because lengths vary (512 whole sequences of uniform random length on 396 CTA
//! slots finish only when the longest does: 0.60 of the achievable rate at b=64 on an H100, 0.86
//! with two waves of chunks), while equal chunks of one long sequence are best in one wave (two
//! waves cost 9-19% more at b=1). When every sequence fits in one chunk the kernel writes final
//! outputs directly; otherwise each chunk writes a partial output and its log-sum-exp, and a merge
//! kernel combines them.
//!
//! Launch order (one CTA per chunk and kv head, the grid is one-dimensional) comes in three forms,
//! all longest first (the longest-processing-time rule, which keeps a long CTA from starting last
//! and running alone: whole sequences of random length, or the last chunk of each sequence, are
//! uneven):
//! - [`LaunchOrder::LongestFirst`]: the kv heads of one chunk stay adjacent, so the CTAs running at
//!   once read neighbouring parts of the same pages (DRAM locality), and the tail is balanced over
//!   the whole grid.
//! - [`LaunchOrder::HeadMajor`]: kv head by kv head, longest first within a head. The CTAs running
//!   at any moment then work on one head's slice of the cache, so pages that several sequences
//!   share (a shared pool, prefix caching) are re-read from L2 rather than DRAM.
//! - [`LaunchOrder::DirectFirst`]: as longest-first, but a split plan's unsplit sequences (direct
//!   items, which write the final output in their own epilogue) go first.
//!
//! None wins everywhere (on an H100 with the reference script's 1 GB pool, head-major is up to
//! 16 % faster for large batches of long sequences and up to 20 % slower for a few waves of short
//! chunks; direct-first was 3 % faster at b16 s1024 on an H200 and 6 % slower at b64 s1024;
//! bench/gpu/NOTES.md), so the backend times each distinct list on the case and keeps the
//! fastest.

/// Smallest chunk worth a CTA of its own: below this the partial output (f32, all heads of the
/// group) and the merge cost more than the parallelism gains. 128 tokens of an fp8 cache with
/// head 128 are 32 KiB of K and V, against 4 KiB of partial output for a group of 8. (256 was
/// measured 15 % slower at b=1 s=1024 on an H100 and no faster anywhere in the table.)
pub const MIN_CHUNK_TOKENS: u32 = 128;

/// Fixed cost of one CTA, in tokens of work: loading the query, filling the pipeline, merging
/// warps and writing the output. From the H100 runs of the tensor-core kernel: 192 with a
/// 128-token minimum chunk matched or beat 256 and 512 in every cell of the table. Re-checked on
/// an H200 after a CTA's fixed cost fell from about 7 to 3 us: 96 and 384 were within 0.3 %
/// (bench/gpu/NOTES.md, run 21).
pub const CTA_OVERHEAD_TOKENS: u64 = 192;

/// Set in a launch entry's `slot` when its sequence is not split (one item): the CTA writes the
/// sequence's final output rows itself, even in a split plan, and the merge kernel skips the
/// sequence (`DB_DIRECT_ITEM` in common.cuh). In a plan of a few long sequences and many short
/// ones, the short ones then pay neither the partial round trip nor the merge.
pub const DIRECT_ITEM: i32 = 1 << 30;

/// Wave counts the planner chooses among.
const CANDIDATE_WAVES: [u64; 3] = [1, 2, 4];

/// One work item: a token range of one sequence. `Copy` and `repr(C)` so it can go to the device
/// as the kernel's `int4`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WorkItem {
    pub batch: i32,
    pub token_begin: i32,
    pub token_end: i32,
    /// In a launch list: the item's partial-output row (its index in [`SplitPlan::items`]) times
    /// the kv-head count, plus the kv head, with [`DIRECT_ITEM`] set when the item is its
    /// sequence's only one. Zero in [`SplitPlan::items`].
    pub slot: i32,
}

impl WorkItem {
    fn tokens(&self) -> u64 {
        (self.token_end - self.token_begin).max(0) as u64
    }

    /// A launch entry's partial row times the kv-head count plus its kv head, without the
    /// [`DIRECT_ITEM`] flag.
    pub fn slot_index(&self) -> i32 {
        self.slot & !DIRECT_ITEM
    }

    /// Whether a launch entry writes its sequence's final output (see [`DIRECT_ITEM`]).
    pub fn is_direct(&self) -> bool {
        self.slot & DIRECT_ITEM != 0
    }
}

/// The plan for one case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitPlan {
    /// Work items, grouped by sequence in order (the grid's x dimension; y is the kv head).
    pub items: Vec<WorkItem>,
    /// `split_offsets[b]..split_offsets[b+1]` are sequence b's items.
    pub split_offsets: Vec<i32>,
    /// Tokens per item (the last item of a sequence may be shorter).
    pub chunk_tokens: u32,
    /// True when every sequence has exactly one item: the kernel writes final outputs and no
    /// merge runs.
    pub direct: bool,
    /// One entry per CTA (item x kv head) in [`LaunchOrder::LongestFirst`] order: the kernel's
    /// work list and grid (see [`SplitPlan::launch_list`] for the other order).
    pub launch: Vec<WorkItem>,
}

/// The order in which a plan's CTAs are launched (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchOrder {
    LongestFirst,
    HeadMajor,
    /// Longest first, with the [`DIRECT_ITEM`] entries ahead of every other: a direct item's
    /// CTA ends in the output's own epilogue (NVFP4's conversion is the longest), while the
    /// others write f32 partials. Launched last, as the longest-first rule puts short items,
    /// those CTAs can be the grid's last to finish and hold up the merge. The same list as
    /// `LongestFirst` for a plan without direct items.
    DirectFirst,
}

impl LaunchOrder {
    pub const ALL: [LaunchOrder; 3] = [
        LaunchOrder::LongestFirst,
        LaunchOrder::HeadMajor,
        LaunchOrder::DirectFirst,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LaunchOrder::LongestFirst => "longest-first",
            LaunchOrder::HeadMajor => "head-major",
            LaunchOrder::DirectFirst => "direct-first",
        }
    }
}

impl SplitPlan {
    /// The launch list in `order`; each CTA's `slot` names its partial row and kv head.
    pub fn launch_list(&self, order: LaunchOrder) -> Vec<WorkItem> {
        let mut launch = self.launch.clone();
        match order {
            LaunchOrder::LongestFirst => {}
            LaunchOrder::HeadMajor => {
                let heads = (self.launch.len() / self.items.len().max(1)).max(1) as i32;
                // Stable: within a head the longest-first order is kept.
                launch.sort_by_key(|w| w.slot_index() % heads);
            }
            // Stable: direct items and the rest each keep the longest-first order.
            LaunchOrder::DirectFirst => launch.sort_by_key(|w| !w.is_direct()),
        }
        launch
    }

    /// Whether some launch entry writes its sequence's final output itself (see [`DIRECT_ITEM`]);
    /// the kernels' `direct_items` parameter says so to the merge.
    pub fn has_direct_items(&self) -> bool {
        self.launch.iter().any(WorkItem::is_direct)
    }

    /// Whether a split plan has one-item sequences that the merge kernel merges (a plan from
    /// [`SplitPlan::without_direct_items`]), rather than their CTAs writing them.
    pub fn merges_one_item_sequences(&self) -> bool {
        let one_item = self.split_offsets.windows(2).any(|w| w[1] - w[0] == 1);
        !self.direct && one_item && !self.has_direct_items()
    }

    /// The same split plan with every sequence merged by the merge kernel, its one-item
    /// sequences included: no launch entry flagged [`DIRECT_ITEM`]. A direct item's CTA
    /// converts and writes its rows in the decode kernel's epilogue, and an NVFP4 epilogue
    /// (amax shuffles, scale factors, software e2m1) can outlast the split CTAs and hold up the
    /// merge: with one 87-token sequence beside three split ones (b4 s1024) the merged plan was
    /// 4 % faster in kbench, with no difference at b16 and b64 (bench/gpu/NOTES.md run 79). In
    /// decodebench it won only beside the merge kernel's one-warp rows (`MergeRows::Narrow`; 6.0
    /// against 6.2 us, run 83). Both write the same bytes: a one-split merge has weight 1.
    pub fn without_direct_items(&self) -> SplitPlan {
        let mut plan = self.clone();
        for w in &mut plan.launch {
            w.slot = w.slot_index();
        }
        plan
    }

    pub fn max_splits(&self) -> usize {
        self.split_offsets
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0)
    }
}

/// Plans the split of `seq_lens` over `num_kv_heads` heads for a GPU that runs
/// `concurrent_ctas` CTAs of the kernel at once. Chunks are multiples of `stage_tokens` and at
/// least `min_chunk_tokens` long.
pub fn plan_splits(
    seq_lens: &[u32],
    num_kv_heads: u32,
    concurrent_ctas: u32,
    stage_tokens: u32,
    min_chunk_tokens: u32,
) -> SplitPlan {
    let stage = stage_tokens.max(1) as u64;
    let max_len = seq_lens.iter().copied().max().unwrap_or(0) as u64;
    let total: u64 = seq_lens.iter().map(|&s| s as u64).sum::<u64>() * num_kv_heads.max(1) as u64;
    let mut best: Option<(u64, SplitPlan)> = None;
    for waves in CANDIDATE_WAVES {
        let slots = concurrent_ctas.max(1) as u64 * waves;
        let chunk = total
            .div_ceil(slots)
            .max(min_chunk_tokens.max(1) as u64)
            .div_ceil(stage)
            * stage;
        // A chunk longer than every sequence means no sequence splits.
        let chunk = chunk.min(max_len.max(1));
        if best
            .as_ref()
            .is_some_and(|(_, p)| p.chunk_tokens as u64 == chunk)
        {
            continue;
        }
        let plan = plan_with_chunk(seq_lens, chunk, num_kv_heads);
        let cost = simulated_makespan(&plan, concurrent_ctas);
        if best.as_ref().is_none_or(|(c, _)| cost < *c) {
            best = Some((cost, plan));
        }
    }
    best.map(|(_, p)| p)
        .unwrap_or_else(|| plan_with_chunk(seq_lens, max_len.max(1), num_kv_heads))
}

/// The plans the backend times on a case before keeping the faster: the planner's
/// ([`plan_splits`]), and, when that one splits while the batch alone has a CTA for at least half
/// the slots (`concurrent_ctas`), every sequence whole, with no partials and no merge. (Half: the
/// 2-stage e4m3 kernel fits 5 CTAs per SM, 660 slots on 132 SMs, and b64's 512 whole-sequence
/// CTAs then all start at once; with the 4-stage kernel's 396 slots the whole plan was 10 %
/// faster than the split one at b64 s1024, bench/gpu/NOTES.md run 36.) The simulated
/// makespan does not see what a split costs beyond its CTAs (the partial outputs' round trip and
/// the merge kernel, about 2.5 us on an H200) nor that a CTA's fixed cost grows when every SM
/// is already streaming: at 64 sequences of up to 1024 tokens the whole plan was 13 % faster on
/// an H200 (bench/gpu/NOTES.md, run 31), at 64 of up to 64k tokens much slower (one long
/// sequence per CTA runs alone at the end). So the choice is measured, as the launch order is.
pub fn plan_candidates(
    seq_lens: &[u32],
    num_kv_heads: u32,
    concurrent_ctas: u32,
    stage_tokens: u32,
    min_chunk_tokens: u32,
) -> Vec<SplitPlan> {
    let best = plan_splits(
        seq_lens,
        num_kv_heads,
        concurrent_ctas,
        stage_tokens,
        min_chunk_tokens,
    );
    let fills =
        2 * seq_lens.len() as u64 * num_kv_heads.max(1) as u64 >= concurrent_ctas.max(1) as u64;
    if best.direct || !fills {
        return vec![best];
    }
    let max_len = seq_lens.iter().copied().max().unwrap_or(0) as u64;
    let whole = plan_with_chunk(seq_lens, max_len.max(1), num_kv_heads);
    vec![best, whole]
}

/// Work items for chunks of `chunk` tokens, and their launch list over `num_kv_heads` heads.
fn plan_with_chunk(seq_lens: &[u32], chunk: u64, num_kv_heads: u32) -> SplitPlan {
    let mut items = Vec::new();
    let mut split_offsets = Vec::with_capacity(seq_lens.len() + 1);
    for (b, &len) in seq_lens.iter().enumerate() {
        split_offsets.push(items.len() as i32);
        let n = (len as u64).div_ceil(chunk).max(1);
        for i in 0..n {
            let begin = (i * chunk).min(len as u64);
            let end = ((i + 1) * chunk).min(len as u64);
            items.push(WorkItem {
                batch: b as i32,
                token_begin: begin as i32,
                token_end: end as i32,
                slot: 0,
            });
        }
    }
    split_offsets.push(items.len() as i32);
    let direct = items.len() == seq_lens.len();
    let heads = num_kv_heads.max(1) as i32;
    let whole = |b: i32| split_offsets[b as usize + 1] - split_offsets[b as usize] == 1;
    let mut launch: Vec<WorkItem> = items
        .iter()
        .enumerate()
        .flat_map(|(row, item)| {
            let flag = if whole(item.batch) { DIRECT_ITEM } else { 0 };
            (0..heads).map(move |h| WorkItem {
                slot: (row as i32 * heads + h) | flag,
                ..*item
            })
        })
        .collect();
    // Longest first; the sort is stable, so equal lengths keep (sequence, kv head) order.
    launch.sort_by_key(|w| std::cmp::Reverse(w.tokens()));
    SplitPlan {
        items,
        split_offsets,
        chunk_tokens: chunk as u32,
        direct,
        launch,
    }
}

/// Time (in tokens) until the last CTA of `plan` finishes when `slots` CTAs run at once and each
/// new CTA takes the first slot to free up, in launch order; each CTA costs its tokens plus
/// [`CTA_OVERHEAD_TOKENS`].
fn simulated_makespan(plan: &SplitPlan, slots: u32) -> u64 {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let mut free_at: BinaryHeap<Reverse<u64>> = (0..slots.max(1)).map(|_| Reverse(0)).collect();
    let mut end = 0;
    for item in &plan.launch {
        let Reverse(start) = free_at.pop().unwrap_or(Reverse(0));
        let finish = start + item.tokens() + CTA_OVERHEAD_TOKENS;
        end = end.max(finish);
        free_at.push(Reverse(finish));
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_without_direct_items_keeps_every_item_and_clears_only_the_flag() {
        // One short sequence (one item, direct) beside three split ones.
        let lens = [87, 626, 962, 1024];
        let plan = plan_with_chunk(&lens, 128, 8);
        assert!(!plan.direct);
        assert!(plan.has_direct_items());
        assert_eq!(plan.launch.iter().filter(|w| w.is_direct()).count(), 8);
        let merged = plan.without_direct_items();
        assert!(!merged.has_direct_items());
        assert!(merged.merges_one_item_sequences() && !plan.merges_one_item_sequences());
        assert!(!merged.direct);
        assert_eq!(merged.items, plan.items);
        assert_eq!(merged.split_offsets, plan.split_offsets);
        assert_eq!(merged.launch.len(), plan.launch.len());
        for (m, w) in merged.launch.iter().zip(&plan.launch) {
            assert_eq!(m.slot, w.slot_index(), "{w:?}");
            assert_eq!(
                (m.batch, m.token_begin, m.token_end),
                (w.batch, w.token_begin, w.token_end)
            );
        }
        // The original covers every token once (so the copy, entry for entry the same ranges,
        // does too).
        covers_every_token(&plan, &lens);
        // Head-major order is derived from the slots, so it is unchanged too.
        let order = |p: &SplitPlan| {
            p.launch_list(LaunchOrder::HeadMajor)
                .iter()
                .map(WorkItem::slot_index)
                .collect::<Vec<_>>()
        };
        assert_eq!(order(&merged), order(&plan));
    }

    #[test]
    fn whole_sequences_are_a_candidate_only_when_the_batch_fills_half_the_gpu() {
        // 64 sequences x 8 kv heads = 512 CTAs on 396 slots: the planner splits (its chunk is
        // below the longest sequence), and the whole plan is offered beside it.
        let lens: Vec<u32> = (0..64).map(|i| 16 + (i * 997) % 1009).collect();
        let c = plan_candidates(&lens, 8, 396, 64, MIN_CHUNK_TOKENS);
        assert_eq!(
            c.len(),
            2,
            "{:?}",
            c.iter().map(|p| p.chunk_tokens).collect::<Vec<_>>()
        );
        assert!(!c[0].direct);
        assert!(c[1].direct);
        assert_eq!(c[1].items.len(), 64);
        assert_eq!(c[1].launch.len(), 512);
        assert!(c[1].launch.iter().all(|w| w.is_direct()));
        covers_every_token(&c[1], &lens);
        assert_eq!(c[0], plan_splits(&lens, 8, 396, 64, MIN_CHUNK_TOKENS));
        // The same batch on 660 slots (5 CTAs per SM) still gets it; on 1100 it does not.
        assert_eq!(
            plan_candidates(&lens, 8, 660, 64, MIN_CHUNK_TOKENS).len(),
            2
        );
        assert_eq!(
            plan_candidates(&lens, 8, 1100, 64, MIN_CHUNK_TOKENS).len(),
            1
        );
        // One long sequence: 8 CTAs cannot fill the GPU, so only the split plan.
        let one = plan_candidates(&[65536], 8, 396, 64, MIN_CHUNK_TOKENS);
        assert_eq!(one.len(), 1);
        assert!(!one[0].direct);
        // Already whole: nothing else to try.
        let short = plan_candidates(&[100; 256], 8, 396, 64, MIN_CHUNK_TOKENS);
        assert_eq!(short.len(), 1);
        assert!(short[0].direct);
    }

    fn covers_every_token(plan: &SplitPlan, seq_lens: &[u32]) {
        for (b, &len) in seq_lens.iter().enumerate() {
            let (lo, hi) = (
                plan.split_offsets[b] as usize,
                plan.split_offsets[b + 1] as usize,
            );
            assert!(hi > lo, "sequence {b} has no item");
            let mut next = 0;
            for item in &plan.items[lo..hi] {
                assert_eq!(item.batch, b as i32);
                assert_eq!(item.token_begin, next);
                assert!(item.token_end > item.token_begin || len == 0);
                next = item.token_end;
            }
            assert_eq!(next, len as i32);
        }
        // Each launch list holds every (item, kv head) once, with the item's tokens, longest
        // first (within each head for head-major).
        let heads = plan.launch.len() / plan.items.len();
        for order in LaunchOrder::ALL {
            let launch = plan.launch_list(order);
            check_launch(plan, &launch, heads, order);
        }
    }

    fn check_launch(plan: &SplitPlan, launch: &[WorkItem], heads: usize, order: LaunchOrder) {
        assert_eq!(launch.len(), plan.launch.len());
        assert_eq!(plan.launch.len(), plan.items.len() * heads);
        let mut seen = vec![false; launch.len()];
        for w in launch {
            let slot = w.slot_index() as usize;
            let (row, head) = (slot / heads, slot % heads);
            assert!(!seen[row * heads + head], "slot {slot} twice");
            seen[row * heads + head] = true;
            let item = plan.items[row];
            assert_eq!(
                (w.batch, w.token_begin, w.token_end),
                (item.batch, item.token_begin, item.token_end)
            );
            // Direct exactly when the item is its sequence's only one.
            let b = item.batch as usize;
            let splits = plan.split_offsets[b + 1] - plan.split_offsets[b];
            assert_eq!(w.is_direct(), splits == 1, "{w:?}");
        }
        let head = |w: &WorkItem| w.slot_index() as usize % heads;
        assert!(launch.windows(2).all(|p| match order {
            LaunchOrder::LongestFirst => p[0].tokens() >= p[1].tokens(),
            LaunchOrder::HeadMajor =>
                head(&p[0]) < head(&p[1])
                    || (head(&p[0]) == head(&p[1]) && p[0].tokens() >= p[1].tokens()),
            LaunchOrder::DirectFirst =>
                (p[0].is_direct() && !p[1].is_direct())
                    || (p[0].is_direct() == p[1].is_direct() && p[0].tokens() >= p[1].tokens()),
        }));
    }

    #[test]
    fn longest_first_shortens_the_tail() {
        // 256 whole sequences of uniform random length on 396 slots: launched in sequence order a
        // long sequence can start last; longest first it cannot.
        let mut x = 12345u64;
        let lens: Vec<u32> = (0..256)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                1 + (x >> 33) as u32 % 1023
            })
            .collect();
        let plan = plan_with_chunk(&lens, 1024, 8);
        let sorted = simulated_makespan(&plan, 396);
        let in_order = SplitPlan {
            launch: (0..plan.items.len())
                .flat_map(|r| {
                    let item = plan.items[r];
                    (0..8).map(move |h| WorkItem {
                        slot: r as i32 * 8 + h,
                        ..item
                    })
                })
                .collect(),
            ..plan.clone()
        };
        let unsorted = simulated_makespan(&in_order, 396);
        assert!(sorted < unsorted, "{sorted} vs {unsorted}");
        let total: u64 = plan
            .launch
            .iter()
            .map(|w| w.tokens() + CTA_OVERHEAD_TOKENS)
            .sum();
        assert!(
            sorted * 100 <= total / 396 * 110,
            "{sorted} vs ideal {}",
            total / 396
        );
    }

    #[test]
    fn big_batches_are_not_split() {
        let lens = vec![4096u32; 256];
        let plan = plan_splits(&lens, 8, 132 * 3, 64, MIN_CHUNK_TOKENS);
        assert!(plan.direct);
        assert_eq!(plan.items.len(), 256);
        covers_every_token(&plan, &lens);
    }

    #[test]
    fn uneven_batches_are_balanced_by_tokens() {
        // 64 sequences of very different lengths on 396 slots: no chunk may be much longer than
        // the average work per slot, which whole sequences would be.
        let lens: Vec<u32> = (0..64u32).map(|i| 1 + i * 2000).collect();
        let slots = 132 * 3;
        let plan = plan_splits(&lens, 8, slots, 64, MIN_CHUNK_TOKENS);
        covers_every_token(&plan, &lens);
        let total: u64 = lens.iter().map(|&l| l as u64 * 8).sum();
        let per_slot = total / slots as u64;
        assert!(!plan.direct);
        assert!(
            (plan.chunk_tokens as u64) <= per_slot,
            "{} vs {per_slot}",
            plan.chunk_tokens
        );
        // And the simulated finish is close to perfect balance, far from the longest sequence.
        let makespan = simulated_makespan(&plan, slots);
        let whole = plan_with_chunk(&lens, 126_001, 8);
        assert!(makespan < simulated_makespan(&whole, slots));
        assert!(makespan * 10 < per_slot * 14, "{makespan} vs {per_slot}");
    }

    #[test]
    fn small_batches_of_long_sequences_fill_the_gpu() {
        let lens = vec![131072u32];
        let ctas = 132 * 8;
        let plan = plan_splits(&lens, 8, ctas, 4, MIN_CHUNK_TOKENS);
        assert!(!plan.direct);
        covers_every_token(&plan, &lens);
        // Equal chunks of one sequence: one wave (chunks rounded up to whole stages, so a few
        // CTAs fewer than the slots).
        let total_ctas = plan.launch.len() as u32;
        assert!(
            total_ctas * 100 >= ctas * 98,
            "{total_ctas} CTAs for {ctas} slots"
        );
        assert!(total_ctas <= ctas + 8, "one wave, not more: {total_ctas}");
        assert_eq!(plan.chunk_tokens % 4, 0);
    }

    #[test]
    fn chunks_respect_the_minimum_and_the_stage() {
        let lens = vec![300u32, 1, 1000];
        let plan = plan_splits(&lens, 2, 10_000, 16, MIN_CHUNK_TOKENS);
        assert_eq!(plan.chunk_tokens, MIN_CHUNK_TOKENS);
        covers_every_token(&plan, &lens);
        assert_eq!(
            plan.max_splits(),
            1000usize.div_ceil(MIN_CHUNK_TOKENS as usize)
        );
        // Forced small chunks (the self-test uses this to exercise the merge).
        let plan = plan_splits(&lens, 2, 10_000, 16, 16);
        assert_eq!(plan.chunk_tokens, 16);
        covers_every_token(&plan, &lens);
        assert_eq!(plan.max_splits(), 1000usize.div_ceil(16));
    }

    #[test]
    fn short_sequences_stay_whole() {
        let lens = vec![10u32, 20, 30];
        let plan = plan_splits(&lens, 1, 10_000, 4, MIN_CHUNK_TOKENS);
        assert!(plan.direct);
        // One kv head: every launch order is the same list (the backend then times one); and
        // with no split, no entry is a direct item of a split plan to move ahead.
        assert_eq!(plan.launch_list(LaunchOrder::HeadMajor), plan.launch);
        assert_eq!(plan.launch_list(LaunchOrder::DirectFirst), plan.launch);
        covers_every_token(&plan, &lens);
    }

    #[test]
    fn direct_first_moves_only_the_unsplit_sequences_ahead() {
        // b4 s1024 as decodebench draws it (seed 0): the 87-token sequence is one item, launched
        // last by the longest-first rule.
        let lens = [87, 626, 962, 1024];
        let plan = plan_with_chunk(&lens, 128, 8);
        assert!(plan.launch[..8].iter().all(|w| !w.is_direct()));
        let list = plan.launch_list(LaunchOrder::DirectFirst);
        check_launch(&plan, &list, 8, LaunchOrder::DirectFirst);
        assert!(
            list[..8].iter().all(|w| w.is_direct() && w.batch == 0),
            "{:?}",
            &list[..8]
        );
        assert!(list[8..].iter().all(|w| !w.is_direct()));
        // The rest in the longest-first order, entry for entry.
        let rest: Vec<_> = plan
            .launch
            .iter()
            .filter(|w| !w.is_direct())
            .copied()
            .collect();
        assert_eq!(list[8..], rest[..]);
        // Without direct items it is the longest-first list.
        let split = plan_with_chunk(&[626, 962, 1024], 128, 8);
        assert_eq!(split.launch_list(LaunchOrder::DirectFirst), split.launch);
    }
}

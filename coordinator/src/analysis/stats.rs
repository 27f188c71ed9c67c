//! The statistics behind `compare` and `report`: medians, geometric means, the Mann-Whitney U test
//! and a seeded bootstrap of the ratio of two medians.
//!
//! Benchmark samples are skewed (a long tail of slow trials from clock changes, preemption, L2
//! state), so every decision here works on ranks and medians, never on means and standard
//! deviations. Everything is deterministic: the bootstrap draws from a seeded [`SplitMix64`] whose
//! output is fixed by its published algorithm, not by a crate version, so the same inputs and seed
//! give the same interval on every machine and every build.

use decodebench_kernels::measurement::percentile;

/// The median of `values` (the mean of the two middle values for an even count, as numpy does);
/// `None` when there are none. NaNs sort last, as `f64::total_cmp` orders them.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some(percentile(&sorted, 50.0))
}

/// Median of `buf` in place (reorders it), without a full sort: the bootstrap calls this
/// thousands of times per comparison.
fn median_in_place(buf: &mut [f64]) -> f64 {
    let n = buf.len();
    let mid = n / 2;
    let (lower, upper_mid, _) = buf.select_nth_unstable_by(mid, f64::total_cmp);
    let upper = *upper_mid;
    if n % 2 == 1 {
        return upper;
    }
    // Even count: the lower middle is the largest element of the left part.
    let lower_mid = lower.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lower_mid + upper) / 2.0
}

/// The geometric mean of `values`; `None` when there are none or any is not a positive finite
/// number (a ratio or a bandwidth of zero has no logarithm, and silently dropping it would bias
/// the mean).
pub fn geometric_mean(values: &[f64]) -> Option<f64> {
    if values.is_empty() || values.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
        return None;
    }
    let log_sum: f64 = values.iter().map(|v| v.ln()).sum();
    Some((log_sum / values.len() as f64).exp())
}

/// The arithmetic mean; `None` when there are no values.
pub fn mean(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    Some(values.iter().sum::<f64>() / values.len() as f64)
}

/// The complementary error function, by the Chebyshev fit of Numerical Recipes (`erfcc`):
/// fractional error below 1.2e-7 everywhere, far finer than any decision made from a p-value.
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// P(Z > z) for a standard normal Z.
pub fn normal_sf(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// The result of a two-sided Mann-Whitney U test of `x` against `y`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MannWhitney {
    /// U of the first sample: the number of (x, y) pairs with x > y, ties counting one half.
    pub u_x: f64,
    /// The normal-approximation z score (continuity-corrected, tie-corrected variance).
    pub z: f64,
    /// Two-sided p-value; 1 when every value is tied (no evidence either way).
    pub p_value: f64,
}

/// Two-sided Mann-Whitney U test with the normal approximation, the tie correction of the
/// variance, and a continuity correction of 0.5 (scipy's `mannwhitneyu(..., method="asymptotic")`
/// defaults). `None` when either sample is empty.
pub fn mann_whitney_u(x: &[f64], y: &[f64]) -> Option<MannWhitney> {
    if x.is_empty() || y.is_empty() {
        return None;
    }
    let n1 = x.len() as f64;
    let n2 = y.len() as f64;
    // Pool with a side marker, sort, and give tied runs their average rank.
    let mut pooled: Vec<(f64, bool)> = x
        .iter()
        .map(|&v| (v, true))
        .chain(y.iter().map(|&v| (v, false)))
        .collect();
    pooled.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut rank_sum_x = 0.0;
    let mut tie_term = 0.0;
    let mut i = 0;
    while i < pooled.len() {
        let mut j = i + 1;
        while j < pooled.len() && pooled[j].0.total_cmp(&pooled[i].0).is_eq() {
            j += 1;
        }
        // Ranks are 1-based: the run i..j holds ranks i+1..=j, whose average is (i+1+j)/2.
        let avg_rank = (i + 1 + j) as f64 / 2.0;
        let in_x = pooled[i..j].iter().filter(|p| p.1).count() as f64;
        rank_sum_x += avg_rank * in_x;
        let t = (j - i) as f64;
        tie_term += t * t * t - t;
        i = j;
    }
    let u_x = rank_sum_x - n1 * (n1 + 1.0) / 2.0;
    let (z, p_value) = asymptotic_u_test(u_x, n1, n2, tie_term);
    Some(MannWhitney { u_x, z, p_value })
}

/// The z score and two-sided p-value of [`mann_whitney_u`]'s normal approximation, from U of the
/// first sample, the sample sizes and the tie term (the sum of t^3 - t over tied runs). One
/// definition for the test and for [`mann_whitney_min_p_value`], so the two cannot drift apart.
fn asymptotic_u_test(u_x: f64, n1: f64, n2: f64, tie_term: f64) -> (f64, f64) {
    let n = n1 + n2;
    let mu = n1 * n2 / 2.0;
    let var = n1 * n2 / 12.0 * ((n + 1.0) - tie_term / (n * (n - 1.0)));
    if var <= 0.0 || !var.is_finite() {
        return (0.0, 1.0);
    }
    let u = u_x.max(n1 * n2 - u_x);
    let z = ((u - mu - 0.5) / var.sqrt()).max(0.0);
    (z, (2.0 * normal_sf(z)).min(1.0))
}

/// The smallest two-sided p-value [`mann_whitney_u`] can return for samples of `n1` and `n2`
/// values without ties: the p-value of two samples that do not overlap at all (U = 0 or
/// n1 * n2). No data can do better, so when this is not below alpha the test cannot call any
/// difference significant, however large: 5 against 5 gives 0.0122, above an alpha of 0.01.
/// (Ties within a side shrink the variance and can push p a little lower; timings rarely tie.)
/// 1 when either sample is empty.
pub fn mann_whitney_min_p_value(n1: usize, n2: usize) -> f64 {
    if n1 == 0 || n2 == 0 {
        return 1.0;
    }
    let (n1, n2) = (n1 as f64, n2 as f64);
    asymptotic_u_test(n1 * n2, n1, n2, 0.0).1
}

/// The fewest samples per side (equal on both sides) with which [`mann_whitney_u`] can reach
/// p < `alpha` at all, i.e. the smallest n with `mann_whitney_min_p_value(n, n) < alpha`: 3 for
/// alpha 0.1, 4 for 0.05, 6 for 0.01, 8 for 0.001. `alpha` must be in (0, 1).
pub fn mann_whitney_samples_needed(alpha: f64) -> usize {
    // The minimum p falls with n (z grows like sqrt(3n/2)) and reaches 0 in f64 near n = 1000,
    // so the loop ends for any positive alpha; the cap only guards against a NaN alpha.
    const MAX_SAMPLES: usize = 1 << 20;
    (1..MAX_SAMPLES)
        .find(|&n| mann_whitney_min_p_value(n, n) < alpha)
        .unwrap_or(MAX_SAMPLES)
}

/// SplitMix64 (Steele, Lea and Flood, 2014): a tiny generator whose output is fixed by its
/// definition, so a seeded bootstrap gives the same answer on every machine and every build.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform index in `0..n` (Lemire's multiply-shift; the bias is below 2^-40 for the sample
    /// counts seen here). `n` must be positive.
    pub fn index(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// A uniform float in [0, 1) with 53 random bits.
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// FNV-1a of `bytes`: mixes a comparison's key into the bootstrap seed, so each comparison's
/// interval depends only on its own data and the seed, not on the order in which it is visited.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(FNV_OFFSET, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// How the bootstrap is run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BootstrapSettings {
    pub resamples: usize,
    /// Two-sided coverage of the interval, e.g. 0.99.
    pub confidence: f64,
    pub seed: u64,
}

/// A point estimate with its bootstrap percentile interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RatioInterval {
    pub ratio: f64,
    pub low: f64,
    pub high: f64,
}

/// The ratio median(candidate) / median(baseline) with a percentile bootstrap interval.
///
/// Each side is a list of groups, one per GPU. The bootstrap is hierarchical: each resample first
/// draws as many GPUs as the side has, with replacement, then each drawn GPU's samples with
/// replacement, and takes the median of everything drawn. With one GPU per side this is the plain
/// bootstrap; with several it lets the card-to-card spread widen the interval, so a comparison
/// between different cards of a SKU does not mistake that spread for a change. The point
/// estimate is the ratio of the medians of all pooled samples.
///
/// `None` when a side has no samples or a median that is not positive.
pub fn median_ratio_interval(
    baseline: &[&[f64]],
    candidate: &[&[f64]],
    settings: BootstrapSettings,
) -> Option<RatioInterval> {
    let mut baseline = ResampledSide::new(baseline);
    let mut candidate = ResampledSide::new(candidate);
    let base_median = baseline.pooled_median()?;
    let cand_median = candidate.pooled_median()?;
    if !(base_median > 0.0 && cand_median.is_finite()) {
        return None;
    }
    let ratio = cand_median / base_median;
    let mut rng = SplitMix64::new(settings.seed);
    let mut ratios = Vec::with_capacity(settings.resamples);
    for _ in 0..settings.resamples {
        let b = baseline.resampled_median(&mut rng);
        let c = candidate.resampled_median(&mut rng);
        let r = c / b;
        if r.is_finite() {
            ratios.push(r);
        }
    }
    if ratios.is_empty() {
        return Some(RatioInterval {
            ratio,
            low: ratio,
            high: ratio,
        });
    }
    ratios.sort_by(f64::total_cmp);
    let tail_pct = (1.0 - settings.confidence) / 2.0 * 100.0;
    Some(RatioInterval {
        ratio,
        low: percentile(&ratios, tail_pct),
        high: percentile(&ratios, 100.0 - tail_pct),
    })
}

/// One side of [`median_ratio_interval`], prepared once so that a resample allocates nothing and
/// moves no sample.
///
/// A resample is a multiset of the side's samples, so it is kept as a count of draws per sample,
/// the samples in sorted order: a draw is one increment, and the median is found by walking the
/// counts until half of the draws are passed, instead of copying every drawn value into a buffer
/// and selecting its middle. The draws are the same (the same calls on the generator, in the same
/// order), and the k-th smallest drawn value is the same value, so the interval is bit-for-bit
/// the one of the copy-and-select resample ([`resampled_median_by_selection`], still used for
/// samples holding a NaN or a zero, where `f64::max` and `f64::total_cmp` may disagree on which
/// of two middle values is larger).
struct ResampledSide<'a> {
    /// The GPUs' sample groups, empty ones left out.
    groups: Vec<&'a [f64]>,
    /// Every sample of the side, sorted by `f64::total_cmp`.
    sorted: Vec<f64>,
    /// Group g's samples are `ranks[starts[g]..starts[g + 1]]`.
    starts: Vec<usize>,
    /// For each group's samples in their own order, the position of the sample in `sorted`.
    ranks: Vec<u32>,
    /// Per position in `sorted`: how many times the current resample drew that sample.
    counts: Vec<u32>,
    /// Counting is off: the side resamples by copying and selecting, into this buffer.
    by_selection: Option<Vec<f64>>,
}

impl<'a> ResampledSide<'a> {
    fn new(groups: &[&'a [f64]]) -> Self {
        let groups: Vec<&'a [f64]> = groups.iter().copied().filter(|g| !g.is_empty()).collect();
        let pooled = groups.concat();
        let mut order: Vec<usize> = (0..pooled.len()).collect();
        order.sort_unstable_by(|&a, &b| pooled[a].total_cmp(&pooled[b]));
        let sorted: Vec<f64> = order.iter().map(|&i| pooled[i]).collect();
        let mut starts = Vec::with_capacity(groups.len() + 1);
        starts.push(0);
        for g in &groups {
            starts.push(starts[starts.len() - 1] + g.len());
        }
        // The most draws one resample can make (every GPU drawn the largest one) must fit a u32
        // count, as must a position in `sorted`.
        let longest = groups.iter().map(|g| g.len()).max().unwrap_or(0);
        let fits = groups
            .len()
            .checked_mul(longest)
            .is_some_and(|n| n < u32::MAX as usize);
        if !fits || pooled.iter().any(|v| v.is_nan() || *v == 0.0) {
            return ResampledSide {
                groups,
                sorted,
                starts,
                ranks: Vec::new(),
                counts: Vec::new(),
                by_selection: Some(Vec::new()),
            };
        }
        let mut ranks = vec![0u32; pooled.len()];
        for (position, &i) in order.iter().enumerate() {
            ranks[i] = position as u32;
        }
        ResampledSide {
            groups,
            counts: vec![0; sorted.len()],
            sorted,
            starts,
            ranks,
            by_selection: None,
        }
    }

    /// The median of every sample of the side; `None` when there are none.
    fn pooled_median(&self) -> Option<f64> {
        // `median` of the pooled samples, whose sort is already done.
        (!self.sorted.is_empty()).then(|| percentile(&self.sorted, 50.0))
    }

    /// One hierarchical resample (GPUs, then samples within each drawn GPU) and its median.
    fn resampled_median(&mut self, rng: &mut SplitMix64) -> f64 {
        if let Some(buf) = &mut self.by_selection {
            return resampled_median_by_selection(&self.groups, rng, buf);
        }
        self.counts.fill(0);
        let gpus = self.starts.len() - 1;
        let mut drawn = 0;
        for _ in 0..gpus {
            let g = rng.index(gpus);
            let ranks = &self.ranks[self.starts[g]..self.starts[g + 1]];
            for _ in 0..ranks.len() {
                self.counts[ranks[rng.index(ranks.len())] as usize] += 1;
            }
            drawn += ranks.len();
        }
        // As `median_in_place`: the value at position drawn / 2 in sorted order, and for an even
        // count the mean of it and the one before.
        let mid = drawn / 2;
        if drawn % 2 == 1 {
            return self.sorted[kth_drawn(&self.counts, mid).0];
        }
        let (lower, through_lower) = kth_drawn(&self.counts, mid - 1);
        let upper = if through_lower > mid {
            lower
        } else {
            // The next sample drawn at all.
            lower
                + 1
                + self.counts[lower + 1..]
                    .iter()
                    .position(|&c| c > 0)
                    .expect("more draws than the lower middle")
        };
        (self.sorted[lower] + self.sorted[upper]) / 2.0
    }
}

/// The position of the k-th smallest (from 0) of the draws counted in `counts`, and how many
/// draws lie at or before that position. Sums 64 counts at a time to skip whole blocks. `k` must
/// be below the total count.
fn kth_drawn(counts: &[u32], k: usize) -> (usize, usize) {
    const BLOCK: usize = 64;
    let mut before = 0;
    for (b, block) in counts.chunks(BLOCK).enumerate() {
        // No overflow: the total of all counts fits a u32 (`ResampledSide::new` checks).
        let in_block = block.iter().sum::<u32>() as usize;
        if before + in_block <= k {
            before += in_block;
            continue;
        }
        for (i, &c) in block.iter().enumerate() {
            before += c as usize;
            if before > k {
                return (b * BLOCK + i, before);
            }
        }
    }
    panic!("kth_drawn: k = {k} is not below the {before} draws counted");
}

/// One hierarchical resample of a side (GPUs, then samples within each) and its median, by
/// copying the drawn values into `buf` and selecting its middle.
fn resampled_median_by_selection(
    groups: &[&[f64]],
    rng: &mut SplitMix64,
    buf: &mut Vec<f64>,
) -> f64 {
    buf.clear();
    for _ in 0..groups.len() {
        let group = groups[rng.index(groups.len())];
        for _ in 0..group.len() {
            buf.push(group[rng.index(group.len())]);
        }
    }
    median_in_place(buf)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A normal draw by Box-Muller, for synthetic samples in tests.
    pub(crate) fn normal(rng: &mut SplitMix64, mean: f64, sd: f64) -> f64 {
        let u1 = 1.0 - rng.unit_f64(); // in (0, 1], so ln is finite
        let u2 = rng.unit_f64();
        mean + sd * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        let mut v = vec![5.0, 1.0, 4.0, 2.0, 3.0, 6.0];
        assert_eq!(median_in_place(&mut v), 3.5);
        let mut v = vec![5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(median_in_place(&mut v), 3.0);
    }

    #[test]
    fn geometric_mean_matches_hand_values() {
        // (1 * 4 * 16)^(1/3) = 4; (2 * 8)^(1/2) = 4.
        assert!((geometric_mean(&[1.0, 4.0, 16.0]).unwrap() - 4.0).abs() < 1e-12);
        assert!((geometric_mean(&[2.0, 8.0]).unwrap() - 4.0).abs() < 1e-12);
        assert_eq!(geometric_mean(&[]), None);
        assert_eq!(geometric_mean(&[1.0, 0.0]), None);
        assert_eq!(geometric_mean(&[1.0, f64::NAN]), None);
        assert_eq!(mean(&[1.0, 2.0, 6.0]), Some(3.0));
    }

    #[test]
    fn normal_tail_matches_tables() {
        // Values from Python's math.erfc: 0.5 * erfc(z / sqrt(2)).
        assert!((normal_sf(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_sf(1.0) - 0.158_655_253_931_457_05).abs() < 1e-7);
        assert!((normal_sf(1.959_963_984_540_054) - 0.025).abs() < 1e-8);
        assert!((normal_sf(3.0) - 0.001_349_898_031_630_094_6).abs() < 1e-9);
        assert!((normal_sf(-1.0) - 0.841_344_746_068_543).abs() < 1e-7);
    }

    #[test]
    fn mann_whitney_on_separated_samples() {
        // x entirely below y: U_x = 0, U = 9, mean 4.5, variance 3*3*7/12 = 5.25,
        // z = (9 - 4.5 - 0.5) / sqrt(5.25), p = 2 * sf(z) = 0.0808556 (scipy's asymptotic value).
        let r = mann_whitney_u(&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]).unwrap();
        assert_eq!(r.u_x, 0.0);
        assert!((r.z - 4.0 / 5.25f64.sqrt()).abs() < 1e-12);
        assert!((r.p_value - 0.080_855_598).abs() < 1e-6, "{}", r.p_value);
        // The test is symmetric in its two samples.
        let s = mann_whitney_u(&[4.0, 5.0, 6.0], &[1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.u_x, 9.0);
        assert!((s.p_value - r.p_value).abs() < 1e-15);
    }

    #[test]
    fn mann_whitney_with_ties() {
        // Pooled: 1x 2x 2x 2y 3x 3y 4y 5y; ranks 1, 3, 3, 3, 5.5, 5.5, 7, 8.
        // R_x = 1 + 3 + 3 + 5.5 = 12.5, U_x = 12.5 - 10 = 2.5, U = 16 - 2.5 = 13.5, mean 8.
        // Ties: one run of 3 (27 - 3 = 24) and one of 2 (8 - 2 = 6), sum 30.
        // Variance = 16/12 * (9 - 30/56) = 11.285714..., z = (13.5 - 8 - 0.5) / sqrt(var).
        let r = mann_whitney_u(&[1.0, 2.0, 2.0, 3.0], &[2.0, 3.0, 4.0, 5.0]).unwrap();
        assert_eq!(r.u_x, 2.5);
        let var = 16.0 / 12.0 * (9.0 - 30.0 / 56.0);
        assert!((r.z - 5.0 / f64::sqrt(var)).abs() < 1e-12);
        // 2 * 0.5 * erfc(1.4883514 / sqrt 2), from Python's math.erfc.
        assert!((r.p_value - 0.136_658_248).abs() < 1e-6, "{}", r.p_value);
    }

    #[test]
    fn mann_whitney_all_tied_is_no_evidence() {
        let r = mann_whitney_u(&[2.0, 2.0], &[2.0, 2.0, 2.0]).unwrap();
        assert_eq!(r.p_value, 1.0);
        assert!(mann_whitney_u(&[], &[1.0]).is_none());
    }

    #[test]
    fn mann_whitney_min_p_matches_hand_values() {
        // Complete separation without ties: U = n1 n2, mean n1 n2 / 2, variance
        // n1 n2 (n1 + n2 + 1) / 12, z = (n1 n2 / 2 - 0.5) / sqrt(variance), p = erfc(z / sqrt 2)
        // (values from Python's math.erfc).
        // 5 vs 5: z = 12 / sqrt(275 / 12) = 2.5067182, p = 0.0121858 > 0.01.
        assert!((mann_whitney_min_p_value(5, 5) - 0.012_185_780).abs() < 1e-7);
        // 6 vs 6: z = 17.5 / sqrt(39) = 2.8022427, p = 0.0050749 < 0.01.
        assert!((mann_whitney_min_p_value(6, 6) - 0.005_074_868).abs() < 1e-7);
        // 4 vs 4: z = 7.5 / sqrt(12) = 2.1650635, p = 0.0303828.
        assert!((mann_whitney_min_p_value(4, 4) - 0.030_382_822).abs() < 1e-7);
        // 3 vs 3: the separated-samples test above, p = 0.0808556.
        assert!((mann_whitney_min_p_value(3, 3) - 0.080_855_598).abs() < 1e-7);
        // Unbalanced: 4 vs 5, z = 9.5 / sqrt(50 / 3) = 2.3270153, p = 0.0199645; 5 vs 20 is
        // plenty: z = 49.5 / sqrt(650 / 3) = 3.3628628, p = 0.00077139.
        assert!((mann_whitney_min_p_value(4, 5) - 0.019_964_453).abs() < 1e-7);
        assert!((mann_whitney_min_p_value(5, 4) - 0.019_964_453).abs() < 1e-7);
        assert!((mann_whitney_min_p_value(5, 20) - 0.000_771_387).abs() < 1e-8);
        // One each: U = 1, z = 0, no evidence possible.
        assert_eq!(mann_whitney_min_p_value(1, 1), 1.0);
        assert_eq!(mann_whitney_min_p_value(0, 5), 1.0);
        // It is what the test returns for separated samples, in either order.
        let (low, high) = ([1.0, 2.0, 3.0, 4.0, 5.0], [6.0, 7.0, 8.0, 9.0, 10.0]);
        let r = mann_whitney_u(&low, &high).unwrap();
        assert_eq!(r.p_value, mann_whitney_min_p_value(5, 5));
        assert_eq!(mann_whitney_u(&high, &low).unwrap().p_value, r.p_value);
        // And no untied 5 vs 5 arrangement beats it (every interleaving raises p).
        let overlapping = mann_whitney_u(&[1.0, 2.0, 3.0, 4.0, 6.0], &[5.0, 7.0, 8.0, 9.0, 10.0]);
        assert!(overlapping.unwrap().p_value > r.p_value);
    }

    #[test]
    fn mann_whitney_samples_needed_per_alpha() {
        // From the minimum p-values above: n = 3 gives 0.081, 4 gives 0.030, 5 gives 0.0122,
        // 6 gives 0.0051, 7 gives 0.0022, 8 gives 0.00094.
        assert_eq!(mann_whitney_samples_needed(0.1), 3);
        assert_eq!(mann_whitney_samples_needed(0.05), 4);
        assert_eq!(mann_whitney_samples_needed(0.01), 6);
        assert_eq!(mann_whitney_samples_needed(0.0122), 5);
        assert_eq!(mann_whitney_samples_needed(0.001), 8);
        assert_eq!(mann_whitney_samples_needed(0.5), 2);
        // Tiny alphas end too (exactly, 1e-300 needs n = 917; the tail underflows near 1000).
        let n = mann_whitney_samples_needed(1e-300);
        assert!((900..=1100).contains(&n), "{n}");
        for alpha in [0.1, 0.05, 0.01, 0.001] {
            let n = mann_whitney_samples_needed(alpha);
            assert!(mann_whitney_min_p_value(n, n) < alpha);
            assert!(mann_whitney_min_p_value(n - 1, n - 1) >= alpha);
        }
    }

    #[test]
    fn splitmix64_matches_its_reference_output() {
        // First outputs for seed 0 from the reference C implementation.
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(rng.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        let mut rng = SplitMix64::new(7);
        for _ in 0..1000 {
            assert!(rng.index(3) < 3);
            let u = rng.unit_f64();
            assert!((0.0..1.0).contains(&u));
        }
    }

    #[test]
    fn bootstrap_is_deterministic_for_a_seed() {
        let mut rng = SplitMix64::new(1);
        let base: Vec<f64> = (0..30).map(|_| normal(&mut rng, 1.0, 0.05)).collect();
        let cand: Vec<f64> = (0..30).map(|_| normal(&mut rng, 1.2, 0.05)).collect();
        let settings = BootstrapSettings {
            resamples: 2000,
            confidence: 0.99,
            seed: 42,
        };
        let a = median_ratio_interval(&[&base], &[&cand], settings).unwrap();
        let b = median_ratio_interval(&[&base], &[&cand], settings).unwrap();
        assert_eq!(a, b, "same seed, same interval");
        let c = median_ratio_interval(
            &[&base],
            &[&cand],
            BootstrapSettings {
                seed: 43,
                ..settings
            },
        )
        .unwrap();
        assert_eq!(
            a.ratio, c.ratio,
            "the point estimate does not depend on the seed"
        );
        assert_ne!(
            (a.low, a.high),
            (c.low, c.high),
            "another seed, other resamples"
        );
        assert!(a.low < a.ratio && a.ratio < a.high, "{a:?}");
        assert!(a.low > 1.1 && a.high < 1.3, "{a:?}");
    }

    #[test]
    fn bootstrap_of_constant_samples_is_exact() {
        let settings = BootstrapSettings {
            resamples: 100,
            confidence: 0.95,
            seed: 0,
        };
        let r = median_ratio_interval(&[&[2.0; 5]], &[&[3.0; 4], &[3.0; 2]], settings).unwrap();
        assert_eq!((r.ratio, r.low, r.high), (1.5, 1.5, 1.5));
        assert!(median_ratio_interval(&[&[]], &[&[1.0]], settings).is_none());
        assert!(median_ratio_interval(&[&[0.0]], &[&[1.0]], settings).is_none());
    }

    #[test]
    fn card_spread_widens_the_hierarchical_interval() {
        // Three cards 2 % apart on each side, tight samples. Pooled, the median sits in the middle
        // card's cluster and barely moves; resampling the cards must let their spread show.
        let mut rng = SplitMix64::new(3);
        let mut card =
            |m: f64| -> Vec<f64> { (0..20).map(|_| normal(&mut rng, m, 0.002)).collect() };
        let base = [card(1.0), card(1.02), card(1.04)];
        let cand = [card(1.0), card(1.02), card(1.04)];
        let settings = BootstrapSettings {
            resamples: 2000,
            confidence: 0.99,
            seed: 9,
        };
        let base_groups: Vec<&[f64]> = base.iter().map(Vec::as_slice).collect();
        let cand_groups: Vec<&[f64]> = cand.iter().map(Vec::as_slice).collect();
        let wide = median_ratio_interval(&base_groups, &cand_groups, settings).unwrap();
        let (pooled_b, pooled_c) = (base.concat(), cand.concat());
        let narrow = median_ratio_interval(&[&pooled_b], &[&pooled_c], settings).unwrap();
        assert!(
            wide.high - wide.low > 2.0 * (narrow.high - narrow.low),
            "{wide:?} {narrow:?}"
        );
        assert!(wide.low < 0.975 && wide.high > 1.025, "{wide:?}");
    }

    /// Random sides for the resampling tests: 1 to 6 GPUs of 1 to 150 samples each (odd and even
    /// totals, blocks of counts longer than `kth_drawn`'s 64), and every third side drawn from
    /// only five values, so that resamples are full of ties.
    fn random_sides(count: usize) -> Vec<Vec<Vec<f64>>> {
        let mut rng = SplitMix64::new(11);
        (0..count)
            .map(|i| {
                let gpus = 1 + rng.index(6);
                (0..gpus)
                    .map(|_| {
                        let len = 1 + rng.index(if i % 2 == 0 { 12 } else { 150 });
                        (0..len)
                            .map(|_| {
                                if i % 3 == 0 {
                                    1.0 + rng.index(5) as f64 * 0.25
                                } else {
                                    normal(&mut rng, 1.0, 0.1).abs() + 0.01
                                }
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn counted_resample_is_the_copied_and_selected_resample() {
        for (i, side) in random_sides(300).iter().enumerate() {
            let groups: Vec<&[f64]> = side.iter().map(Vec::as_slice).collect();
            let mut counted = ResampledSide::new(&groups);
            assert!(counted.by_selection.is_none());
            assert_eq!(counted.pooled_median(), median(&groups.concat()));
            let (mut rng_a, mut rng_b) = (SplitMix64::new(i as u64), SplitMix64::new(i as u64));
            let mut buf = Vec::new();
            for _ in 0..50 {
                let a = counted.resampled_median(&mut rng_a);
                let b = resampled_median_by_selection(&groups, &mut rng_b, &mut buf);
                assert_eq!(a.to_bits(), b.to_bits(), "side {i}: {a} != {b}");
                // And both are the sort-based median of what was drawn.
                let drawn: Vec<f64> = counted
                    .sorted
                    .iter()
                    .zip(&counted.counts)
                    .flat_map(|(&v, &c)| std::iter::repeat_n(v, c as usize))
                    .collect();
                assert_eq!(drawn.len(), buf.len());
                assert_eq!(Some(a), median(&drawn), "side {i}");
            }
            // The same draws: both generators are at the same point of their stream.
            assert_eq!(rng_a.next_u64(), rng_b.next_u64(), "side {i}");
        }
    }

    #[test]
    fn kth_drawn_matches_the_sorted_draws() {
        let mut rng = SplitMix64::new(5);
        for len in [1, 2, 63, 64, 65, 200] {
            for _ in 0..20 {
                // Mostly zeros, as a resample of a large side leaves most samples undrawn.
                let counts: Vec<u32> = (0..len)
                    .map(|_| {
                        if rng.index(3) == 0 {
                            rng.index(4) as u32
                        } else {
                            0
                        }
                    })
                    .collect();
                let positions: Vec<usize> = counts
                    .iter()
                    .enumerate()
                    .flat_map(|(p, &c)| std::iter::repeat_n(p, c as usize))
                    .collect();
                for (k, &p) in positions.iter().enumerate() {
                    let through = positions.iter().filter(|&&q| q <= p).count();
                    assert_eq!(kth_drawn(&counts, k), (p, through), "{counts:?} k = {k}");
                }
            }
        }
    }

    #[test]
    fn sides_with_a_nan_or_a_zero_resample_by_selection() {
        for odd in [f64::NAN, 0.0, -0.0] {
            let groups: [&[f64]; 2] = [&[1.0, odd, 2.0], &[3.0, 4.0]];
            let mut side = ResampledSide::new(&groups);
            assert!(side.by_selection.is_some(), "{odd}");
            let (mut rng_a, mut rng_b) = (SplitMix64::new(1), SplitMix64::new(1));
            let mut buf = Vec::new();
            for _ in 0..20 {
                let a = side.resampled_median(&mut rng_a);
                let b = resampled_median_by_selection(&groups, &mut rng_b, &mut buf);
                assert_eq!(a.to_bits(), b.to_bits());
            }
        }
    }

    #[test]
    fn fnv1a_reference_values() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}

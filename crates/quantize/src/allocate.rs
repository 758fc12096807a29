//! Choosing one layout per linear under a size budget: each linear offers points
//! `(bytes, damage)` (one per bits / group / axis it may take), and the allocation picks one
//! point per linear minimising the summed damage with the summed bytes at most the budget.
//!
//! Solved as a multiple-choice knapsack by dynamic programming over the bytes above each
//! linear's cheapest point, counted in whole units (bytes rounded up per point, the budget
//! rounded down, so the result never exceeds it): exact when a unit is one byte, and at most
//! [`MAX_UNITS`] units otherwise. Bytes the rounding left over are then spent exactly by
//! greedy upgrades (the largest damage drop per byte that still fits).

use crate::error::{Error, Result};

/// One way to store one linear.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    /// Bytes on disk of this layout.
    pub bytes: u64,
    /// Predicted damage (non-negative, finite); only sums and comparisons are used.
    pub damage: f64,
}

/// The chosen point of every linear.
#[derive(Clone, Debug, PartialEq)]
pub struct Allocation {
    /// Index into each linear's points.
    pub choice: Vec<usize>,
    /// Summed bytes of the chosen points (at most the budget).
    pub bytes: u64,
    /// Summed damage of the chosen points.
    pub damage: f64,
}

/// Largest number of budget units the table spans (memory: linears x units bytes).
pub const MAX_UNITS: u64 = 1 << 16;

/// The bytes of the cheapest and of the dearest choice for every linear.
pub fn reachable(points: &[Vec<Point>]) -> (u64, u64) {
    let lo = points.iter().map(|p| p.iter().map(|q| q.bytes).min().unwrap_or(0)).sum();
    let hi = points.iter().map(|p| p.iter().map(|q| q.bytes).max().unwrap_or(0)).sum();
    (lo, hi)
}

/// The allocation of least summed damage whose summed bytes are at most `budget`.
///
/// Errors: a linear without points, more than 255 points, a non-finite or negative damage,
/// or a budget below the cheapest choice ([`Error::Budget`], naming the reachable range).
pub fn allocate(points: &[Vec<Point>], budget: u64) -> Result<Allocation> {
    for p in points {
        if p.is_empty() || p.len() > 255 {
            return Err(Error::Invalid("allocation: every linear needs between 1 and 255 layouts"));
        }
        if p.iter().any(|q| !q.damage.is_finite() || q.damage < 0.0) {
            return Err(Error::Invalid("allocation: a damage is negative or not finite"));
        }
    }
    let (cheapest, dearest) = reachable(points);
    if budget < cheapest {
        return Err(Error::Budget { budget, cheapest, dearest });
    }
    let base: Vec<u64> = points.iter().map(|p| p.iter().map(|q| q.bytes).min().unwrap_or(0)).collect();
    let slack = budget - cheapest;
    let unit = slack.div_ceil(MAX_UNITS).max(1);
    let units = (slack / unit) as usize;
    let extra = |i: usize, k: usize| (points[i][k].bytes - base[i]).div_ceil(unit) as usize;
    // best[u]: least damage of the linears so far within u units; pick[i][u]: linear i's point.
    let mut best = vec![0f64; units + 1];
    let mut pick = vec![vec![0u8; units + 1]; points.len()];
    let mut next = vec![f64::INFINITY; units + 1];
    for (i, p) in points.iter().enumerate() {
        next.fill(f64::INFINITY);
        for (k, q) in p.iter().enumerate() {
            let e = extra(i, k);
            for u in e..=units {
                let d = best[u - e] + q.damage;
                if d < next[u] {
                    next[u] = d;
                    pick[i][u] = k as u8;
                }
            }
        }
        std::mem::swap(&mut best, &mut next);
    }
    let mut choice = vec![0usize; points.len()];
    let mut u = units;
    for i in (0..points.len()).rev() {
        let k = pick[i][u] as usize;
        choice[i] = k;
        u -= extra(i, k);
    }
    fill(points, &mut choice, budget);
    let bytes = choice.iter().enumerate().map(|(i, &k)| points[i][k].bytes).sum();
    let damage = choice.iter().enumerate().map(|(i, &k)| points[i][k].damage).sum();
    Ok(Allocation { choice, bytes, damage })
}

/// Spend what the budget still allows: while some linear has a point of lower damage whose
/// extra bytes fit, take the one with the largest damage drop per extra byte.
fn fill(points: &[Vec<Point>], choice: &mut [usize], budget: u64) {
    let mut used: u64 = choice.iter().enumerate().map(|(i, &k)| points[i][k].bytes).sum();
    loop {
        let left = budget - used;
        let mut best: Option<(f64, usize, usize)> = None;
        for (i, p) in points.iter().enumerate() {
            let now = p[choice[i]];
            for (k, q) in p.iter().enumerate() {
                let drop = now.damage - q.damage;
                if drop <= 0.0 || q.bytes > now.bytes + left {
                    continue;
                }
                let rate = drop / (q.bytes.saturating_sub(now.bytes).max(1)) as f64;
                if best.is_none_or(|(r, _, _)| rate > r) {
                    best = Some((rate, i, k));
                }
            }
        }
        let Some((_, i, k)) = best else { return };
        used = used - points[i][choice[i]].bytes + points[i][k].bytes;
        choice[i] = k;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A seeded generator (splitmix64).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn table(rng: &mut Rng, linears: usize, per: usize, max_bytes: u64) -> Vec<Vec<Point>> {
        (0..linears)
            .map(|_| {
                (0..per)
                    .map(|_| Point { bytes: 1 + rng.below(max_bytes), damage: rng.below(1000) as f64 / 7.0 })
                    .collect()
            })
            .collect()
    }

    fn brute(points: &[Vec<Point>], budget: u64) -> f64 {
        let mut best = f64::INFINITY;
        let mut idx = vec![0usize; points.len()];
        loop {
            let bytes: u64 = idx.iter().enumerate().map(|(i, &k)| points[i][k].bytes).sum();
            if bytes <= budget {
                best = best.min(idx.iter().enumerate().map(|(i, &k)| points[i][k].damage).sum());
            }
            let mut i = 0;
            while i < idx.len() {
                idx[i] += 1;
                if idx[i] < points[i].len() {
                    break;
                }
                idx[i] = 0;
                i += 1;
            }
            if i == idx.len() {
                return best;
            }
        }
    }

    #[test]
    fn equals_brute_force_on_small_tables() {
        let mut rng = Rng(7);
        for _ in 0..300 {
            let n = 1 + rng.below(5) as usize;
            let per = 1 + rng.below(4) as usize;
            let points = table(&mut rng, n, per, 40);
            let (lo, hi) = reachable(&points);
            let budget = lo + rng.below(hi - lo + 1);
            let a = allocate(&points, budget).unwrap();
            assert!(a.bytes <= budget);
            let want = brute(&points, budget);
            assert!((a.damage - want).abs() <= 1e-9 * want.max(1.0), "{} vs brute force {want}", a.damage);
        }
    }

    #[test]
    fn never_exceeds_the_budget_and_rounding_costs_little() {
        // Byte counts large enough that units are many bytes: the result still fits, and is
        // never worse than the best single layout for all linears that fits.
        let mut rng = Rng(11);
        for _ in 0..40 {
            let (n, per) = (1 + rng.below(60) as usize, 1 + rng.below(8) as usize);
            let points = table(&mut rng, n, per, 50_000_000);
            let (lo, hi) = reachable(&points);
            let budget = lo + rng.below(hi - lo + 1);
            let a = allocate(&points, budget).unwrap();
            assert!(a.bytes <= budget, "{} > {budget}", a.bytes);
            let cheapest: f64 = points
                .iter()
                .map(|p| {
                    p.iter().min_by(|a, b| a.bytes.cmp(&b.bytes).then(a.damage.total_cmp(&b.damage))).unwrap().damage
                })
                .sum();
            assert!(a.damage <= cheapest + 1e-9);
        }
    }

    #[test]
    fn a_budget_below_the_cheapest_names_the_range() {
        let points = vec![vec![Point { bytes: 10, damage: 1.0 }, Point { bytes: 20, damage: 0.5 }]; 3];
        match allocate(&points, 29) {
            Err(Error::Budget { budget: 29, cheapest: 30, dearest: 60 }) => {}
            other => panic!("{other:?}"),
        }
        let all = allocate(&points, 1000).unwrap();
        assert_eq!((all.bytes, all.choice), (60, vec![1, 1, 1]));
    }

    #[test]
    fn bad_tables_are_errors() {
        assert!(allocate(&[vec![]], 10).is_err());
        assert!(allocate(&[vec![Point { bytes: 1, damage: f64::NAN }]], 10).is_err());
        assert!(allocate(&[vec![Point { bytes: 1, damage: -1.0 }]], 10).is_err());
    }
}

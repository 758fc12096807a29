//! A seeded orthogonal rotation of a model's residual stream (QuaRot / SpinQuant's offline
//! rotation, QuIP's incoherence processing): `Q = D (H ⊗ R)`, `D` random signs, `H` the
//! normalised Sylvester Hadamard matrix of the largest power of two dividing the width, `R` a
//! random orthogonal matrix of the odd rest (a 576-wide model: `H_64 ⊗ R_9`). Every input
//! channel of a rotated linear mixes all the residual channels, so a few outlier channels no
//! longer decide a group's range. Orthogonal, so RMSNorm commutes with it: `W diag(g) Q` for the
//! linears that read the stream, `Q^T W` for those that write it.

use crate::error::{Error, Result};
use faer::linalg::matmul::matmul;
use faer::{Accum, MatRef, Par};

/// An `n x n` orthogonal matrix (row-major, f64).
#[derive(Clone, Debug, PartialEq)]
pub struct Rotation {
    n: usize,
    q: Vec<f64>,
}

impl Rotation {
    /// The width it rotates.
    pub fn width(&self) -> usize {
        self.n
    }

    /// Entry `(i, j)`.
    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.q[i * self.n + j]
    }
}

/// `Q` for width `n` and `seed`: orthogonal to rounding.
pub fn rotation(n: usize, seed: u64) -> Result<Rotation> {
    if n == 0 {
        return Err(Error::Invalid("a rotation of width 0"));
    }
    let p = 1usize << n.trailing_zeros();
    let m = n / p;
    let mut rng = SplitMix(seed ^ 0x0005_eed0_f0a7_a7e5_u64);
    let r = random_orthogonal(m, &mut rng);
    let scale = 1.0 / (p as f64).sqrt();
    let signs: Vec<f64> = (0..n).map(|_| if rng.next() >> 63 == 0 { 1.0 } else { -1.0 }).collect();
    let mut q = vec![0f64; n * n];
    for a in 0..p {
        for b in 0..m {
            let row = a * m + b;
            for c in 0..p {
                let h = if (a & c).count_ones() % 2 == 0 { scale } else { -scale };
                for d in 0..m {
                    q[row * n + c * m + d] = signs[row] * h * r[b * m + d];
                }
            }
        }
    }
    Ok(Rotation { n, q })
}

/// `W' = W diag(g) Q` for a `[rows, n]` linear reading the rotated stream after an RMSNorm of
/// weight `g` (`None`: no norm in between).
pub fn rotate_inputs(w: &[f32], rows: usize, g: Option<&[f32]>, q: &Rotation) -> Result<Vec<f32>> {
    let n = q.n;
    check(w.len() == rows * n, "rotate_inputs: the weight", rows * n, w.len())?;
    if let Some(g) = g {
        check(g.len() == n, "rotate_inputs: the norm weight", n, g.len())?;
    }
    let wg: Vec<f64> = w
        .chunks_exact(n.max(1))
        .flat_map(|r| r.iter().enumerate().map(|(j, &v)| f64::from(v) * g.map_or(1.0, |g| f64::from(g[j]))))
        .collect();
    let mut out = faer::Mat::<f64>::zeros(rows, n);
    let (a, b) = (MatRef::from_row_major_slice(&wg, rows, n), MatRef::from_row_major_slice(&q.q, n, n));
    matmul(out.as_mut(), Accum::Replace, a, b, 1.0, Par::rayon(0));
    Ok((0..rows).flat_map(|i| (0..n).map(move |j| (i, j))).map(|(i, j)| out[(i, j)] as f32).collect())
}

/// `W' = Q^T W` for a `[n, cols]` linear (or a bias, `cols` 1) writing into the rotated stream.
pub fn rotate_outputs(w: &[f32], cols: usize, q: &Rotation) -> Result<Vec<f32>> {
    let n = q.n;
    check(w.len() == n * cols, "rotate_outputs: the weight", n * cols, w.len())?;
    let w64: Vec<f64> = w.iter().map(|&v| f64::from(v)).collect();
    let mut out = faer::Mat::<f64>::zeros(n, cols);
    let (a, b) = (MatRef::from_row_major_slice(&q.q, n, n).transpose(), MatRef::from_row_major_slice(&w64, n, cols));
    matmul(out.as_mut(), Accum::Replace, a, b, 1.0, Par::rayon(0));
    Ok((0..n).flat_map(|i| (0..cols).map(move |j| (i, j))).map(|(i, j)| out[(i, j)] as f32).collect())
}

fn check(ok: bool, what: &'static str, expected: usize, got: usize) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::Shape { what, expected, got })
    }
}

/// A random `m x m` orthogonal matrix (row-major): Gram-Schmidt, twice, on Gaussian rows.
fn random_orthogonal(m: usize, rng: &mut SplitMix) -> Vec<f64> {
    let mut r: Vec<f64> = (0..m * m).map(|_| rng.gauss()).collect();
    for i in 0..m {
        for _ in 0..2 {
            for k in 0..i {
                let dot: f64 = (0..m).map(|j| r[i * m + j] * r[k * m + j]).sum();
                for j in 0..m {
                    r[i * m + j] -= dot * r[k * m + j];
                }
            }
        }
        let norm = (0..m).map(|j| r[i * m + j] * r[i * m + j]).sum::<f64>().sqrt();
        for j in 0..m {
            r[i * m + j] /= norm;
        }
    }
    r
}

/// SplitMix64: the seeded stream the rotation draws from.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn gauss(&mut self) -> f64 {
        (-2.0 * self.uniform().ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_off_identity(q: &Rotation) -> f64 {
        let (n, mut worst) = (q.width(), 0f64);
        for i in 0..n {
            for k in 0..n {
                let dot: f64 = (0..n).map(|j| q.at(i, j) * q.at(k, j)).sum();
                worst = worst.max((dot - if i == k { 1.0 } else { 0.0 }).abs());
            }
        }
        worst
    }

    #[test]
    fn rotations_are_orthogonal_seeded_and_spread_every_channel() {
        for n in [1, 2, 9, 12, 64, 96, 576] {
            let q = rotation(n, 7).unwrap();
            assert!(max_off_identity(&q) < 1e-12, "width {n}");
            assert_eq!(q, rotation(n, 7).unwrap(), "width {n}: same seed, same rotation");
            if n > 1 {
                assert_ne!(q, rotation(n, 8).unwrap(), "width {n}: the seed matters");
            }
        }
        // Incoherence: a single channel's unit vector lands spread over many channels.
        let q = rotation(576, 1).unwrap();
        let biggest = (0..576).map(|j| q.at(0, j).abs()).fold(0f64, f64::max);
        assert!(biggest < 0.2, "row 0's largest entry {biggest}");
    }

    #[test]
    fn a_rotated_norm_and_linear_pair_computes_the_same_outputs() {
        // y = W (g * x / rms(x)) against W' (x' / rms(x')) with x' = Q^T x.
        let (rows, n) = (5, 24);
        let q = rotation(n, 3).unwrap();
        let w: Vec<f32> = (0..rows * n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0).collect();
        let g: Vec<f32> = (0..n).map(|i| 0.5 + (i % 7) as f32 / 3.0).collect();
        let x: Vec<f32> = (0..n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 30.0).collect();
        let w2 = rotate_inputs(&w, rows, Some(&g), &q).unwrap();
        let x2 = rotate_outputs(&x, 1, &q).unwrap();
        let rms = |v: &[f32]| (v.iter().map(|a| a * a).sum::<f32>() / v.len() as f32).sqrt();
        let (r1, r2) = (rms(&x), rms(&x2));
        assert!((r1 - r2).abs() < 1e-5 * r1);
        for i in 0..rows {
            let y1: f32 = (0..n).map(|j| w[i * n + j] * g[j] * x[j] / r1).sum();
            let y2: f32 = (0..n).map(|j| w2[i * n + j] * x2[j] / r2).sum();
            assert!((y1 - y2).abs() < 1e-4 * (1.0 + y1.abs()), "row {i}: {y1} vs {y2}");
        }
        // Writing into the stream: Q^T (W a) = (Q^T W) a.
        let a: Vec<f32> = (0..rows).map(|i| i as f32 - 2.0).collect();
        let wo: Vec<f32> = (0..n * rows).map(|i| ((i * 29 % 83) as f32 - 41.0) / 50.0).collect();
        let wo2 = rotate_outputs(&wo, rows, &q).unwrap();
        let h: Vec<f32> = (0..n).map(|i| (0..rows).map(|k| wo[i * rows + k] * a[k]).sum()).collect();
        let h_rot = rotate_outputs(&h, 1, &q).unwrap();
        for i in 0..n {
            let v: f32 = (0..rows).map(|k| wo2[i * rows + k] * a[k]).sum();
            assert!((v - h_rot[i]).abs() < 1e-4, "channel {i}");
        }
    }

    #[test]
    fn wrong_shapes_are_errors() {
        let q = rotation(4, 0).unwrap();
        assert!(rotate_inputs(&[0.0; 7], 2, None, &q).is_err());
        assert!(rotate_inputs(&[0.0; 8], 2, Some(&[1.0; 3]), &q).is_err());
        assert!(rotate_outputs(&[0.0; 7], 2, &q).is_err());
        assert!(rotation(0, 0).is_err());
    }
}

//! `y = W' x` straight from packed codes, for both axes and every width.
//!
//! Where the time goes: a matvec reads every packed weight once and does one multiply-add
//! per weight, so it is bound by memory bandwidth once the matrix is larger than the caches;
//! the work is to decode codes as fast as they arrive. Eight `b`-bit codes are exactly `b`
//! bytes ([`crate::bits`]): one unaligned 32-bit load (64-bit for b = 8), eight shifts and
//! masks, a conversion and a multiply-add, on eight lanes at once once LLVM vectorizes the
//! lane loop (`vpsrlvd` / `vcvtdq2ps` / `vfmadd` under AVX2).
//! The row loop is compiled for AVX-512, AVX2+FMA and the baseline, picked at run time;
//! [`matvec_ref`] is the plain definition beside it, in f64.

use adadim_quantize::Axis;
use rayon::prelude::*;

use crate::bits;
use crate::format::PackedLinear;

/// `sum_j code(c0 + j) * v[j]` over a packed row of `B`-bit codes (`c0 % 8 == 0` for the fast path).
#[inline(always)]
fn dot_codes<const B: usize>(row: &[u8], c0: usize, v: &[f32]) -> f32 {
    if c0 % 8 != 0 {
        return v.iter().enumerate().map(|(j, &x)| f32::from(bits::get(row, c0 + j, B as u8)) * x).sum();
    }
    let mask = ((1u64 << B) - 1) as u32;
    let base = c0 / 8 * B;
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let tail = chunks.remainder();
    for (i, x) in chunks.enumerate() {
        let at = base + i * B;
        let mut q = [0u32; 8];
        if B <= 4 {
            // Eight codes in the low 8B <= 32 bits of one word.
            let w = u32::from_le_bytes(row[at..at + 4].try_into().expect("4 bytes"));
            for (l, q) in q.iter_mut().enumerate() {
                *q = (w >> (l * B)) & mask;
            }
        } else {
            let w = u64::from_le_bytes(row[at..at + 8].try_into().expect("8 bytes"));
            for (l, q) in q.iter_mut().enumerate() {
                *q = (w >> (l * B)) as u32 & mask;
            }
        }
        for l in 0..8 {
            acc[l] += q[l] as f32 * x[l];
        }
    }
    let n = v.len() - tail.len();
    let tail_sum: f32 = tail.iter().enumerate().map(|(j, &x)| f32::from(bits::get(row, c0 + n + j, B as u8)) * x).sum();
    // Pairwise lane sum, fixed order.
    let s4 = [acc[0] + acc[4], acc[1] + acc[5], acc[2] + acc[6], acc[3] + acc[7]];
    (s4[0] + s4[2]) + (s4[1] + s4[3]) + tail_sum
}

/// `dot_codes` for the layout's width.
#[inline(always)]
fn dot(bits: u8, row: &[u8], c0: usize, v: &[f32]) -> f32 {
    match bits {
        2 => dot_codes::<2>(row, c0, v),
        3 => dot_codes::<3>(row, c0, v),
        4 => dot_codes::<4>(row, c0, v),
        _ => dot_codes::<8>(row, c0, v),
    }
}

/// What every row needs from `x`, computed once per call.
enum Prepared {
    /// per-OC: `x` (gathered by `perm` if any) and its sum over each group.
    Oc { x: Vec<f32>, xsum: Vec<f32> },
    /// per-IC: `v[kr][c] = s[kr, c] x[c]` and `bias[kr] = sum_c z[kr, c] v[kr][c]`.
    Ic { v: Vec<f32>, bias: Vec<f32> },
}

fn prepare(p: &PackedLinear, x: &[f32]) -> Prepared {
    let (cols, l) = (p.cols, p.layout);
    match l.axis {
        Axis::Oc => {
            let x: Vec<f32> = match &p.perm {
                Some(perm) => perm.iter().map(|&c| x[c as usize]).collect(),
                None => x.to_vec(),
            };
            let xsum = x.chunks(l.group).map(|g| g.iter().sum()).collect();
            Prepared::Oc { x, xsum }
        }
        Axis::Ic => {
            let pr = p.rows.div_ceil(l.group);
            let mut v = vec![0f32; pr * cols];
            let mut bias = vec![0f32; pr];
            for kr in 0..pr {
                let (s, z) = (&p.scales[kr * cols..(kr + 1) * cols], &p.zeros[kr * cols..(kr + 1) * cols]);
                let vk = &mut v[kr * cols..(kr + 1) * cols];
                let mut b = 0f32;
                for c in 0..cols {
                    vk[c] = s[c] * x[c];
                    b += z[c] * vk[c];
                }
                bias[kr] = b;
            }
            Prepared::Ic { v, bias }
        }
    }
}

/// Rows `r0..r0 + y.len()` of `W' x`.
#[inline(always)]
fn rows_body(p: &PackedLinear, prep: &Prepared, r0: usize, y: &mut [f32]) {
    let (cols, l) = (p.cols, p.layout);
    let rb = bits::row_bytes(cols, l.bits);
    for (i, y) in y.iter_mut().enumerate() {
        let r = r0 + i;
        let row = &p.codes[r * rb..(r + 1) * rb + bits::PAD.min(p.codes.len() - (r + 1) * rb)];
        *y = match prep {
            Prepared::Oc { x, xsum } => {
                let pc = xsum.len();
                let (s, z) = (&p.scales[r * pc..(r + 1) * pc], &p.zeros[r * pc..(r + 1) * pc]);
                let mut acc = 0f32;
                for k in 0..pc {
                    let c0 = k * l.group;
                    let d = dot(l.bits, row, c0, &x[c0..(c0 + l.group).min(cols)]);
                    acc += s[k] * (d - z[k] * xsum[k]);
                }
                acc
            }
            Prepared::Ic { v, bias } => {
                let kr = r / l.group;
                dot(l.bits, row, 0, &v[kr * cols..(kr + 1) * cols]) - bias[kr]
            }
        };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn rows_v4(p: &PackedLinear, prep: &Prepared, r0: usize, y: &mut [f32]) {
    rows_body(p, prep, r0, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_v3(p: &PackedLinear, prep: &Prepared, r0: usize, y: &mut [f32]) {
    rows_body(p, prep, r0, y)
}

/// The widest row loop this CPU runs.
fn rows_dispatch(p: &PackedLinear, prep: &Prepared, r0: usize, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl") {
            // SAFETY: the features rows_v4 is compiled for were detected just above.
            return unsafe { rows_v4(p, prep, r0, y) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: as above, for AVX2 + FMA.
            return unsafe { rows_v3(p, prep, r0, y) };
        }
    }
    rows_body(p, prep, r0, y)
}

/// Rows per parallel task: enough work to amortize scheduling.
const ROWS_PER_TASK: usize = 32;

impl PackedLinear {
    /// `y = W' x` (`x` has `cols` values, `y` gets `rows`), from the packed codes.
    ///
    /// # Panics
    /// If `x.len() != cols` or `y.len() != rows` (a caller's bug, not bad input).
    pub fn matvec(&self, x: &[f32], y: &mut [f32]) {
        assert_eq!(x.len(), self.cols, "matvec: x has {} values for {} input channels", x.len(), self.cols);
        assert_eq!(y.len(), self.rows, "matvec: y has {} values for {} output channels", y.len(), self.rows);
        let prep = prepare(self, x);
        y.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(|(t, y)| rows_dispatch(self, &prep, t * ROWS_PER_TASK, y));
    }

    /// One thread, no dispatch: the portable loop (for tests of the dispatched one).
    pub fn matvec_portable(&self, x: &[f32], y: &mut [f32]) {
        assert_eq!((x.len(), y.len()), (self.cols, self.rows));
        let prep = prepare(self, x);
        rows_body(self, &prep, 0, y);
    }
}

/// Output channels dequantized per task of [`PackedLinear::matmul`]: 64 rows of f32 stay in L2.
const PANEL: usize = 64;

impl PackedLinear {
    /// `Y = X W'^T` for `t` tokens: `x` row-major `[t, cols]`, `y` row-major `[t, rows]`
    /// (prefill and evaluation). Panels of [`PANEL`] output channels are dequantized into a
    /// small f32 buffer and multiplied with one GEMM each; panels run in parallel. The
    /// dequantization costs `1/t` of the GEMM's work, so this runs at the f32 GEMM rate while
    /// the weights stay packed in memory.
    pub fn matmul(&self, x: &[f32], t: usize, y: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        assert_eq!(x.len(), t * cols, "matmul: x is not [{t}, {cols}]");
        assert_eq!(y.len(), t * rows, "matmul: y is not [{t}, {rows}]");
        let y_ptr = SendPtr(y.as_mut_ptr());
        (0..rows.div_ceil(PANEL)).into_par_iter().for_each_init(
            || vec![0f32; PANEL * cols],
            |panel, k| {
                let (r0, r1) = (k * PANEL, ((k + 1) * PANEL).min(rows));
                let n = r1 - r0;
                let w = &mut panel[..n * cols];
                self.dequantize_rows(r0, w);
                let y_ptr = &y_ptr;
                // SAFETY: dst is columns r0..r1 of the row-major (t x rows) `y`, which no other
                // task writes; lhs is x (t x cols, row-major); rhs is W'^T read from the panel
                // (element (c, j) = w[j * cols + c]). All indices stay inside their buffers.
                unsafe {
                    gemm::gemm(
                        t, n, cols, y_ptr.0.add(r0), 1, rows as isize, false,
                        x.as_ptr(), 1, cols as isize,
                        w.as_ptr(), cols as isize, 1,
                        0.0, 1.0, false, false, false, gemm::Parallelism::None,
                    );
                }
            },
        );
    }
}

/// A pointer the panel tasks share; each writes its own columns only.
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint columns of the buffer behind it (see `matmul`).
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// The definition: `y[r] = sum_c W'[r, c] x[c]` with `W'` from [`PackedLinear::dequantize`],
/// accumulated in f64. Also returns `sum_c |W'[r, c] x[c]|` per row, the scale of the round-off.
pub fn matvec_ref(p: &PackedLinear, x: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let w = p.dequantize();
    w.chunks(p.cols)
        .map(|row| row.iter().zip(x).fold((0.0, 0.0), |(s, a), (&w, &x)| (s + f64::from(w) * f64::from(x), a + (f64::from(w) * f64::from(x)).abs())))
        .unzip()
}

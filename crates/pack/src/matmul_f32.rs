//! `Y = X W'^T` for many tokens in f32, exact up to round-off (evaluation; prompts where no
//! integer product applies): panels of `PANEL` output channels are dequantized into a small
//! f32 buffer and multiplied with one GEMM each, panels in parallel. The dequantization costs
//! `1/t` of the GEMM's work, so this runs at the f32 GEMM rate while the weights stay packed.

use rayon::prelude::*;

use crate::format::PackedLinear;

/// Output channels dequantized per task: 64 rows of f32 stay in L2.
const PANEL: usize = 64;

/// `Y = X W'^T` for `t` tokens: `x` row-major `[t, cols]`, `y` row-major `[t, rows]` (checked by
/// the caller).
pub(crate) fn matmul(p: &PackedLinear, x: &[f32], t: usize, y: &mut [f32]) {
    let (rows, cols) = (p.rows, p.cols);
    let y_ptr = SendPtr(y.as_mut_ptr());
    (0..rows.div_ceil(PANEL)).into_par_iter().for_each_init(
        || vec![0f32; PANEL * cols],
        |panel, k| {
            let (r0, r1) = (k * PANEL, ((k + 1) * PANEL).min(rows));
            let n = r1 - r0;
            let w = &mut panel[..n * cols];
            p.dequantize_rows(r0, w);
            let y_ptr = &y_ptr;
            // SAFETY: dst is columns r0..r1 of the row-major (t x rows) `y`, which no other
            // task writes; lhs is x (t x cols, row-major); rhs is W'^T read from the panel
            // (element (c, j) = w[j * cols + c]). All indices stay inside their buffers.
            unsafe {
                gemm::gemm(
                    t,
                    n,
                    cols,
                    y_ptr.0.add(r0),
                    1,
                    rows as isize,
                    false,
                    x.as_ptr(),
                    1,
                    cols as isize,
                    w.as_ptr(),
                    cols as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        },
    );
}

/// A pointer the panel tasks share; each writes its own columns only.
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint columns of the buffer behind it (see `matmul`).
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

//! Weight-only quantization of one linear layer at a time, with quantization groups along
//! output channels (per-OC, the usual layout) or input channels (per-IC, the AdaDim paper's),
//! chosen per layer.
//!
//! The flow for one layer `W [C_out, C_in]` (row-major `&[f32]`, no tensor library):
//!
//! 1. [`Hessian::add_batch`] accumulates `H = (2/n) sum x x^T` over the layer's calibration
//!    inputs.
//! 2. [`choose_axis`] quantizes `W` with [`rtn`] along both axes and keeps the one whose
//!    output error (paper Eq. 3) is lower; [`output_error_from_hessian`] measures it from `H`.
//! 3. Either keep that RTN result, or run [`gptq`] along the chosen axis ("GPTQ-ada").
//! 4. The [`QuantizedMatrix`] holds codes and per-group params; `dequantize()` gives `W'`.
//!
//! Every step shares one quantizer ([`QuantSpec::fit`], [`quantize`], [`dequantize`]) and
//! takes the axis as a parameter.
//!
//! ```
//! use adadim_quantize::{choose_axis, gptq, Axis, Calibration, GptqOptions, Hessian, QuantSpec, Zero};
//! let (rows, cols, tokens) = (8, 16, 64);
//! let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
//! let x: Vec<f32> = (0..tokens * cols).map(|i| ((i * 53 % 97) as f32 / 48.0) - 1.0).collect();
//! let mut h = Hessian::new(cols);
//! h.add_batch(&x)?;
//! let spec = QuantSpec { bits: 4, group: Some(8), axis: Axis::Oc, zero: Zero::Awq };
//! let choice = choose_axis(&w, rows, cols, &spec, Calibration::Hessian(&h))?;
//! let out = gptq(&w, rows, cols, &h, &spec.with_axis(choice.axis), &GptqOptions::default())?;
//! assert_eq!(out.quantized.dequantize().len(), rows * cols);
//! # Ok::<(), adadim_quantize::Error>(())
//! ```

// Matrices are named as in the papers and in faer (`W`, `H`, `Hinv`, `X`, `Err1`).
#![allow(non_snake_case)]
#![warn(missing_docs)]

mod ada;
pub mod allocate;
pub mod awq;
mod descend;
mod error;
mod gptq;
mod grid;
mod hessian;
mod matrix;
mod propagate;
mod quantizer;
mod refit;
pub mod rotate;
mod rtn;
mod search;

pub use ada::{
    choose_axis, choose_axis_fitted, output_error, output_error_from_hessian, rtn_candidates, AxisChoice, Calibration,
    Candidates,
};
pub use descend::{descend_codes, Descent};
pub use error::{Error, Result};
pub use gptq::{gptq, GptqOptions, GptqOutput};
pub use hessian::{Hessian, HessianSum};
pub use matrix::QuantizedMatrix;
pub use propagate::{Correction, Drift};
pub use quantizer::{dequantize, f16_scale, quantize, Axis, GroupParams, QuantSpec, Zero};
pub use refit::{refit_scales, Refit};
pub use rtn::{rtn, rtn_fitted, Fitter};
pub use search::ScaleSearch;
/// The error search's pieces, for tests and references.
pub mod scale_search {
    pub use crate::search::{fit, grid_search, ratio, weighted_error, weighted_error_portable, STEPS};
}

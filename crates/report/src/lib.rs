//! # adadim-report
//!
//! After `quantize`: pictures of what a run did, on one page.
//!
//! ```text
//! RUN_DIR/report.json, input_rms.safetensors  -> Run::open
//!     (a) errors.rs   per layer, RTN output error per-OC vs per-IC and the dimension kept (Fig. 6/10)
//!     (b) inputs.rs   input-channel RMS of one block, and peak/median across blocks     (Fig. 8)
//!     (c) updates.rs  GPTQ re-run on one linear in both dimensions: its update per input  (Fig. 7)
//!                     channel (needs the source model and the run's calibration samples)
//! plot.rs: every figure is panels of line / dot series, written as SVG by plotters
//! page.rs: the SVGs + README.md in PAGE_DIR
//! ```
//!
//! ```no_run
//! use adadim_report::{page::{write_page, PageOptions}, Run};
//! let run = Run::open(std::path::Path::new("runs/smollm2-w3g128"))?;
//! let opts = PageOptions { layer: run.layers() - 1, updates: None, outliers: None, command: "adadim report runs/smollm2-w3g128".into() };
//! let page = write_page(&run, std::path::Path::new("runs/smollm2-w3g128/report"), &opts)?;
//! println!("{}", page.index.display());
//! # Ok::<(), adadim_report::ReportError>(())
//! ```

pub mod allocation;
pub mod error;
pub mod errors;
pub mod inputs;
pub mod outliers;
pub mod page;
pub mod plot;
pub mod run;
pub mod updates;

pub use error::{ReportError, Result};
pub use run::Run;

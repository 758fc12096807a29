#![no_main]
//! A mode byte, then `resume.json` -> `WorkDir::open`, or a block file (with a manifest holding
//! its checksum) -> `WorkDir::open`, the block reader, `dequantize`.
use adadim_fuzz::calibrate_targets::{resume, ResumeScratch};
use std::sync::OnceLock;

static SCRATCH: OnceLock<ResumeScratch> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| resume(SCRATCH.get_or_init(ResumeScratch::new), data));

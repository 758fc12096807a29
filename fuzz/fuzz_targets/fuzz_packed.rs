#![no_main]
//! A packed checkpoint -> `PackedFile::open`, every `linear` (layout checks), the kernels.
use adadim_fuzz::pack_targets::{packed, Scratch};
use std::sync::OnceLock;

static SCRATCH: OnceLock<Scratch> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| packed(SCRATCH.get_or_init(Scratch::new), data));

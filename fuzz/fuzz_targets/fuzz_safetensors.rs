#![no_main]
//! `model.safetensors` -> `Checkpoint::open` (mmap, header, layout) and every `tensor_f32`.
use adadim_fuzz::load_targets::{safetensors, Scratch};
use std::sync::OnceLock;

static SCRATCH: OnceLock<Scratch> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| safetensors(SCRATCH.get_or_init(Scratch::new), data));

#![no_main]
//! A GGUF file -> `Gguf::open`, `config`, `tokenizer::from_gguf`, every `tensor_f32`, import.
use adadim_fuzz::load_targets::{gguf, Scratch};
use std::sync::OnceLock;

static SCRATCH: OnceLock<Scratch> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| gguf(SCRATCH.get_or_init(Scratch::new), data));

#![no_main]
//! `tokenizer_config.json` -> `tokenizer::config`, then the chat template recognized and rendered.
use adadim_fuzz::calibrate_targets::{tokenizer_config, TokenizerScratch};
use std::sync::OnceLock;

static SCRATCH: OnceLock<TokenizerScratch> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokenizer_config(SCRATCH.get_or_init(TokenizerScratch::new), data));

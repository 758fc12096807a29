#![no_main]
//! `config.json` -> `LlamaConfig::from_json` and what a loader derives from it.
libfuzzer_sys::fuzz_target!(|data: &[u8]| adadim_fuzz::load_targets::config(data));

//! The fuzz targets' bodies, shared with the corpus replay tests of the main workspace.

#[path = "load_targets.rs"]
pub mod load_targets;
#[path = "pack_targets.rs"]
pub mod pack_targets;
#[path = "calibrate_targets.rs"]
pub mod calibrate_targets;

//! Sizes taken from flags, checked before anything is allocated: against the model's trained
//! context and against this machine's memory and disk, with an error naming the flag and the
//! bytes it would take.

use adadim_load::LlamaConfig;
use anyhow::Result;
use std::path::Path;

/// `MemAvailable` (Linux), in bytes.
pub fn available_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = s.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// How many bytes of down_proj inputs a quantization run keeps rather than recomputes
/// (`QuantizeConfig::act_cache_bytes`): a quarter of the memory available now, never less than
/// the library's default, so a machine with room skips the second gate/up pass.
pub fn act_cache_bytes() -> usize {
    let floor = adadim_calibrate::ACT_CACHE_BYTES;
    available_memory().map_or(floor, |a| usize::try_from(a / 4).unwrap_or(usize::MAX).max(floor))
}

/// Free bytes for an unprivileged writer on the filesystem holding `dir`.
pub fn available_disk(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

fn gb(bytes: f64) -> String {
    if bytes >= 1e9 {
        format!("{:.1} GB", bytes / 1e9)
    } else {
        format!("{:.0} MB", (bytes / 1e6).ceil())
    }
}

/// Bytes a forward pass over `t` positions holds beside the weights (f32): RoPE tables, the KV
/// cache, each thread's tile of attention scores (64 queries of a head group against `t`
/// keys), the MLP's activations and the logits.
pub fn forward_bytes(cfg: &LlamaConfig, t: usize) -> f64 {
    let t = t as f64;
    let rope = t * cfg.head_dim() as f64 * 4.0;
    let kv = 2.0 * cfg.num_hidden_layers as f64 * t * cfg.kv_dim() as f64 * 4.0;
    let group = (cfg.num_attention_heads / cfg.n_kv_heads().max(1)).max(1) as f64;
    let scores = rayon::current_num_threads() as f64 * group * 64.0 * t * 4.0;
    let acts = t * (4 * cfg.hidden_size + 3 * cfg.intermediate_size + cfg.vocab_size) as f64 * 4.0;
    rope + kv + scores + acts
}

/// `positions` (what `flag` asks for) within the model's trained context and this machine's
/// memory.
pub fn check_positions(cfg: &LlamaConfig, config_path: &Path, positions: usize, flag: &str) -> Result<()> {
    if let Some(max) = cfg.max_position_embeddings.filter(|&m| positions > m) {
        anyhow::bail!("{flag}: {positions} positions go past the model's trained context of {max} (max_position_embeddings in {})", config_path.display());
    }
    check_memory(flag, forward_bytes(cfg, positions), &format!("a forward pass over {positions} positions"))
}

/// `need` bytes for `what` (asked for by `flag`) within the memory available now.
pub fn check_memory(flag: &str, need: f64, what: &str) -> Result<()> {
    if let Some(avail) = available_memory().filter(|&a| need > a as f64) {
        anyhow::bail!(
            "{flag}: {what} needs about {}, more than the {} of memory available",
            gb(need),
            gb(avail as f64)
        );
    }
    Ok(())
}

/// Calibration of `nsamples` x `seqlen` tokens: the hidden states in memory (block input and
/// output, one MLP activation) and on disk (the resume state keeps one copy, two while the
/// next replaces it), checked before a token is drawn.
pub fn check_calibration(cfg: &LlamaConfig, nsamples: usize, seqlen: usize, work_parent: &Path) -> Result<()> {
    let tokens = nsamples as f64 * seqlen as f64;
    let flags = format!("--nsamples {nsamples} x --calib-seqlen {seqlen}");
    let per_token = (2 * cfg.hidden_size + cfg.intermediate_size) as f64 * 4.0;
    check_memory(&flags, tokens * per_token + forward_bytes(cfg, seqlen), &format!("calibration on {tokens} tokens"))?;
    let disk = 2.0 * tokens * cfg.hidden_size as f64 * 4.0;
    if let Some(free) = available_disk(work_parent).filter(|&f| disk > f as f64) {
        anyhow::bail!(
            "{flags}: the saved calibration states need about {} on {}, which has {} free",
            gb(disk),
            work_parent.display(),
            gb(free as f64)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_requests_are_refused_small_ones_pass() {
        let cfg = adadim_load::synth::tiny_config();
        assert!(check_memory("--x", 1e6, "a small thing").is_ok());
        let e = check_memory("--x 9", 1e18, "a huge thing").unwrap_err().to_string();
        assert!(e.starts_with("--x 9: a huge thing needs about") && e.contains("GB"), "{e}");
        let e = check_calibration(&cfg, 100_000_000, 512, Path::new("/tmp")).unwrap_err().to_string();
        assert!(e.contains("--nsamples 100000000"), "{e}");
        assert!(check_calibration(&cfg, 4, 32, Path::new("/tmp")).is_ok());
        let mut c = cfg.clone();
        c.max_position_embeddings = Some(64);
        let e = check_positions(&c, Path::new("m/config.json"), 65, "--seqlen").unwrap_err().to_string();
        assert!(e.contains("trained context of 64") && e.contains("m/config.json"), "{e}");
        c.max_position_embeddings = None;
        assert!(check_positions(&c, Path::new("c"), 1_000_000_000, "--max-tokens")
            .unwrap_err()
            .to_string()
            .contains("needs about"));
    }
}

//! llama.cpp's side of the quality comparisons: its `llama-quantize` types of a model, with and
//! without an importance matrix from our calibration text, imported with `import-gguf` and
//! evaluated by *our* evaluator, with the bits each file stores for the decoder-block linears.
//! `adadim bench llamacpp` makes and measures every type on several texts (issue 32's
//! frontier) and draws them beside our models' points.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::args::{BenchLlamacppArgs, LlamaSideArgs};
use crate::cmd::eval::run_ppl;
use crate::resolve::resolve_dataset;
use adadim_eval::datasets::Dataset;
use adadim_load::fetch::adadim_home;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The seven linears of a block, as llama.cpp's GGUF names them.
pub const GGUF_LINEARS: [&str; 7] = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];

/// Every type `llama-quantize` makes that a user picks for a 2-6 bit model: legacy, k- and
/// i-quants.
pub const ALL_TYPES: &str = "Q2_K,Q3_K_S,Q3_K_M,Q3_K_L,Q4_0,Q4_1,Q4_K_S,Q4_K_M,Q5_0,Q5_1,Q5_K_S,Q5_K_M,Q6_K,\
IQ2_XXS,IQ2_XS,IQ2_S,IQ2_M,IQ3_XXS,IQ3_XS,IQ3_S,IQ3_M,IQ4_NL,IQ4_XS";

/// Stored bits and weights of the block linears of a GGUF file (each tensor's own type).
pub fn gguf_bits(path: &Path) -> Result<(u64, u64)> {
    let g = adadim_load::gguf::Gguf::open(path)?;
    let (mut bits, mut weights) = (0u64, 0u64);
    for (name, info) in &g.content.tensor_infos {
        let is_linear = name
            .strip_prefix("blk.")
            .and_then(|r| r.split_once('.'))
            .is_some_and(|(_, t)| GGUF_LINEARS.iter().any(|l| t == format!("{l}.weight")));
        if !is_linear {
            continue;
        }
        let n = info.shape.elem_count() as u64;
        let (block, size) = g.block_of(name).unwrap_or((1, 4));
        anyhow::ensure!(
            n.is_multiple_of(block),
            "{}: tensor {name} has {n} values, not a whole number of {block}-value blocks",
            path.display()
        );
        bits += 8 * n / block * size;
        weights += n;
    }
    anyhow::ensure!(weights > 0, "{}: no blk.N.{{attn,ffn}}_*.weight tensors", path.display());
    Ok((bits, weights))
}

/// The error of a tool that failed: its status and the tail of what it printed.
fn tool_failed(what: &str, out: &Output) -> anyhow::Error {
    let err = String::from_utf8_lossy(&out.stderr);
    let tail: String = err.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    anyhow::anyhow!("{what} failed ({}):\n{tail}", out.status)
}

/// Run `cmd`, failing with its stderr's tail when it fails.
pub fn run_tool(mut cmd: Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        return Err(tool_failed(what, &out));
    }
    Ok(())
}

/// Whether a failed `llama-quantize` refused because the type needs an importance matrix
/// (IQ1, IQ2_XXS/XS/S, IQ3_XXS tensors and Q2_K_S files are never made without one).
pub fn refused_for_imatrix(out: &Output) -> bool {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    text.contains("requires an importance matrix") || text.contains("requires an imatrix")
}

/// What the llama.cpp side needs.
pub struct LlamaSide {
    pub bin: PathBuf,
    /// The float source GGUF (for SmolLM2 the shipped Q4_1, requantized).
    pub gguf: PathBuf,
    /// Calibration text for `llama-imatrix` (the corpus our runs calibrate on).
    pub calib: PathBuf,
    /// Chunks x context of the importance matrix: the same number of tokens as our calibration.
    pub chunks: usize,
    pub ctx: usize,
    pub threads: usize,
    pub types: Vec<String>,
    /// Only the files made with the importance matrix.
    pub imatrix_only: bool,
    calib_name: String,
    /// The first 12 hex digits of the source GGUF's SHA-256 and of the calibration text's: every
    /// file made from them carries them in its name, so a cache made from other inputs (another
    /// text under the same name, another source) is never taken for this one.
    source_id: String,
    calib_id: String,
}

/// A llama.cpp file made by [`LlamaSide::quantize`]: `TYPE` or `TYPE-imatrix`, and where it is.
pub struct Made {
    pub name: String,
    pub path: PathBuf,
}

/// The first 12 hex digits of the SHA-256 of `text`.
fn short_hash(text: &str) -> String {
    adadim_load::fetch::sha256_hex(text.as_bytes())[..12].to_string()
}

impl LlamaSide {
    /// The side the arguments describe: the source GGUF found, the calibration text fetched.
    pub fn new(a: &LlamaSideArgs) -> Result<Self> {
        let gguf = a.gguf.clone().unwrap_or_else(|| adadim_home().join("models/smollm2.gguf"));
        anyhow::ensure!(
            gguf.exists(),
            "{}: source GGUF not found (run `adadim eval ppl --model smollm2` once to fetch it, or pass --gguf)",
            gguf.display()
        );
        // A named set resolves as `quantize --calib` does (the chat set reads the template of
        // the model the GGUF was fetched beside).
        let calib = adadim_calibrate::data::calibration_file(&a.calib, &adadim_home(), &gguf.with_extension(""))?;
        let id = |path: &Path| -> Result<String> {
            Ok(adadim_load::fetch::sha256_file(path).with_context(|| format!("hashing {}", path.display()))?[..12]
                .to_string())
        };
        let (source_id, calib_id) = (id(&gguf)?, id(&calib)?);
        Ok(LlamaSide {
            bin: a.llamacpp.clone(),
            gguf,
            calib,
            chunks: a.chunks,
            ctx: a.ctx,
            threads: rayon::current_num_threads(),
            types: a.types.clone(),
            imatrix_only: a.imatrix_only,
            calib_name: a.calib.clone(),
            source_id,
            calib_id,
        })
    }

    /// Each type is made without the importance matrix `m` (unless `--imatrix-only`) and with it.
    pub fn with_and_without<'m>(&self, m: &'m Path) -> Vec<Option<&'m Path>> {
        if self.imatrix_only {
            vec![Some(m)]
        } else {
            vec![None, Some(m)]
        }
    }

    /// The importance matrix in `dir` (computed once), said on stderr.
    pub fn imatrix_announced(&self, dir: &Path) -> Result<PathBuf> {
        eprintln!("llama.cpp importance matrix ({} x {} tokens of {}) ...", self.chunks, self.ctx, self.calib_name);
        self.imatrix(dir)
    }

    /// The importance matrix in `dir` (computed once for this source, text and size).
    pub fn imatrix(&self, dir: &Path) -> Result<PathBuf> {
        let path = self.imatrix_path(dir);
        if !path.exists() {
            let tmp = dir.join("imatrix.tmp.dat");
            let mut c = Command::new(self.bin.join("llama-imatrix"));
            c.arg("-m").arg(&self.gguf).arg("-f").arg(&self.calib).arg("-o").arg(&tmp);
            c.args([
                "-c",
                &self.ctx.to_string(),
                "--chunks",
                &self.chunks.to_string(),
                "-t",
                &self.threads.to_string(),
            ]);
            run_tool(c, "llama-imatrix")?;
            std::fs::rename(&tmp, &path)?;
        }
        Ok(path)
    }

    /// Where [`LlamaSide::imatrix`] keeps the importance matrix of this source, text and size.
    fn imatrix_path(&self, dir: &Path) -> PathBuf {
        let name = Path::new(&self.calib_name).file_stem().map_or("calib".into(), |s| s.to_string_lossy());
        let key = short_hash(&format!("{} {}", self.source_id, self.calib_id));
        dir.join(format!("imatrix-{name}-{}x{}-{key}.dat", self.chunks, self.ctx))
    }

    /// The name and file of `ty` made from this source (and the importance matrix `imatrix`).
    fn made(&self, dir: &Path, ty: &str, imatrix: Option<&Path>) -> Made {
        let name = format!("{ty}{}", if imatrix.is_some() { "-imatrix" } else { "" });
        let from = imatrix.and_then(Path::file_name).map_or_else(String::new, |m| m.to_string_lossy().into_owned());
        let key = short_hash(&format!("{} {from}", self.source_id));
        let path = dir.join(format!("{name}-{key}.gguf"));
        Made { name, path }
    }

    /// `llama-quantize` of the source into `TYPE[-imatrix]-KEY.gguf` in `dir` (made once; `KEY`
    /// names the source and the importance matrix it was made from); `None` when
    /// llama-quantize will not make the type without an importance matrix.
    pub fn quantize(&self, dir: &Path, ty: &str, imatrix: Option<&Path>) -> Result<Option<Made>> {
        let Made { name, path } = self.made(dir, ty, imatrix);
        if !path.exists() {
            let tmp = dir.join(format!("{name}.tmp.gguf"));
            let mut c = Command::new(self.bin.join("llama-quantize"));
            c.arg("--allow-requantize").args(["--token-embedding-type", "f32"]);
            if let Some(m) = imatrix {
                c.arg("--imatrix").arg(m);
            }
            c.arg(&self.gguf).arg(&tmp).arg(ty).arg(self.threads.to_string());
            let out = c.output().context("starting llama-quantize")?;
            if !out.status.success() {
                let _ = std::fs::remove_file(&tmp);
                if imatrix.is_none() && refused_for_imatrix(&out) {
                    return Ok(None);
                }
                return Err(tool_failed(&format!("llama-quantize {ty}"), &out));
            }
            std::fs::rename(&tmp, &path)?;
        }
        Ok(Some(Made { name, path }))
    }
}

/// `file` evaluated by our evaluator on each dataset (`windows` x `seqlen`): its f32 import made
/// once into `dir` and removed afterwards (0.5 GB for SmolLM2; the GGUF stays), each
/// perplexity cached as `dir/NAME.LABEL.WINDOWSxSEQLEN.ppl.json`.
pub fn evaluate_gguf(file: &Path, dir: &Path, datasets: &[Dataset], seqlen: usize, windows: usize) -> Result<Vec<f64>> {
    let name = file.file_stem().unwrap_or_default().to_string_lossy().to_string();
    let cached = |d: &Dataset| dir.join(format!("{name}.{}.{windows}x{seqlen}.ppl.json", d.label));
    let import = dir.join(&name);
    let mut made_import = false;
    let mut out = Vec::new();
    for d in datasets {
        let path = cached(d);
        if !path.exists() {
            if !import.join("config.json").exists() {
                let mut bar = crate::progress::Bar::new("import", 0);
                adadim_load::gguf::import_gguf(file, &import, &mut |d, t| bar.update(d, t))
                    .with_context(|| format!("importing {}", file.display()))?;
                bar.finish();
                made_import = true;
            }
            eprintln!("evaluating {name} on {} ...", d.label);
            let r = run_ppl(&import, d, seqlen, Some(windows))?;
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_string(&r)?)?;
            std::fs::rename(&tmp, &path)?;
        }
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("{}: not JSON", path.display()))?;
        out.push(v["ppl"].as_f64().with_context(|| format!("{}: no number 'ppl'", path.display()))?);
    }
    if made_import {
        std::fs::remove_dir_all(&import)?;
    }
    Ok(out)
}

/// One model on the frontier: bits per weight of its block linears and its perplexity on
/// each text (label -> ppl).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FrontierPoint {
    pub name: String,
    pub bpw: f64,
    pub ppl: BTreeMap<String, f64>,
}

/// What `bench llamacpp` writes (`points.json`) and what `--ours` reads: the float model's
/// perplexity per text and the points.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Frontier {
    #[serde(default)]
    pub fp: BTreeMap<String, f64>,
    pub points: Vec<FrontierPoint>,
    /// Types llama-quantize would not make (without an importance matrix), with why.
    #[serde(default)]
    pub not_made: Vec<String>,
}

impl Frontier {
    fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a frontier JSON ({{\"fp\", \"points\"}})", path.display()))
    }
}

pub fn bench_llamacpp(a: BenchLlamacppArgs) -> Result<()> {
    let datasets = a.datasets.iter().map(|d| resolve_dataset(d)).collect::<Result<Vec<_>>>()?;
    let ours = a.ours.as_deref().map(Frontier::read).transpose()?;
    let side = LlamaSide::new(&a.llama)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let imatrix = side.imatrix_announced(&a.out)?;
    let mut result = Frontier { fp: ours.as_ref().map(|o| o.fp.clone()).unwrap_or_default(), ..Frontier::default() };
    for ty in &side.types {
        for im in side.with_and_without(&imatrix) {
            let Some(Made { name, path: file }) = side.quantize(&a.out, ty, im)? else {
                eprintln!("{ty}: llama-quantize makes it only with an importance matrix");
                result.not_made.push(format!("{ty}: llama-quantize makes it only with an importance matrix"));
                continue;
            };
            let ppl = evaluate_gguf(&file, &a.out, &datasets, a.seqlen, a.windows)?;
            let (bits, weights) = gguf_bits(&file)?;
            result.points.push(FrontierPoint {
                name,
                bpw: bits as f64 / weights as f64,
                ppl: datasets.iter().map(|d| d.label.clone()).zip(ppl).collect(),
            });
        }
    }
    result.points.sort_by(|x, y| x.bpw.total_cmp(&y.bpw));
    let json = a.out.join("points.json");
    let tmp = json.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&result)?)?;
    std::fs::rename(&tmp, &json)?;
    for p in &result.points {
        let cells: Vec<String> = p.ppl.iter().map(|(k, v)| format!("{k} {v:.3}")).collect();
        println!("{:<16} {:.3} bpw  {}", p.name, p.bpw, cells.join("  "));
    }
    eprintln!("wrote {}", json.display());
    if let (Some(ours), Some(svg)) = (ours, &a.svg) {
        plot_frontier(&ours, &result, &datasets, svg)?;
        eprintln!("wrote {}", svg.display());
    }
    Ok(())
}

/// One panel per text: perplexity (log) against bits per weight, our points and llama.cpp's,
/// each with its frontier, the float model as a line across.
pub fn plot_frontier(ours: &Frontier, llama: &Frontier, datasets: &[Dataset], path: &Path) -> Result<()> {
    use super::quality::{panel, Point, PLOT_MAX_RATIO};
    use adadim_report::plot::{render, Figure};
    let mut panels = Vec::new();
    for d in datasets {
        let fp = *ours.fp.get(&d.label).with_context(|| format!("--ours: no FP perplexity for {}", d.label))?;
        let mut points = Vec::new();
        for (tool, side) in [("adadim", ours), ("llama.cpp", llama)] {
            for p in &side.points {
                if let Some(&ppl) = p.ppl.get(&d.label) {
                    points.push(Point { name: p.name.clone(), tool: tool.into(), bpw: p.bpw, ppl });
                }
            }
        }
        let title =
            format!("{} perplexity vs bits per weight (block linears); above {PLOT_MAX_RATIO}x FP not shown", d.label);
        panels.push(panel(title, &points, fp));
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    render(&Figure { panels, columns: 1, panel_size: (900, 520) }, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn files_made_from_other_inputs_are_never_taken_for_these() {
        let side = |source: &str, calib: &str| LlamaSide {
            bin: PathBuf::new(),
            gguf: PathBuf::from("model.gguf"),
            calib: PathBuf::from("mix.txt"),
            chunks: 32,
            ctx: 512,
            threads: 2,
            types: vec![],
            imatrix_only: false,
            calib_name: "mix".into(),
            source_id: source.into(),
            calib_id: calib.into(),
        };
        let dir = Path::new("out");
        let (a, b, c) = (side("s1", "c1"), side("s1", "c2"), side("s2", "c1"));
        // Another text under the same name, or another source: another importance matrix.
        let m = [a.imatrix_path(dir), b.imatrix_path(dir), c.imatrix_path(dir)];
        assert!(m[0] != m[1] && m[0] != m[2] && m[1] != m[2], "{m:?}");
        assert_eq!(a.imatrix_path(dir), side("s1", "c1").imatrix_path(dir), "the same inputs find their file");
        // A file made with either matrix, or from another source, is another file; the name
        // the tables show stays the type's.
        let with = |s: &LlamaSide, m: &Path| s.made(dir, "Q4_0", Some(m));
        let files = [with(&a, &m[0]).path, with(&b, &m[1]).path, with(&c, &m[2]).path, a.made(dir, "Q4_0", None).path];
        for (i, f) in files.iter().enumerate() {
            assert!(files[i + 1..].iter().all(|g| g != f), "{files:?}");
        }
        assert_ne!(a.made(dir, "Q4_0", None).path, c.made(dir, "Q4_0", None).path);
        assert_eq!(with(&a, &m[0]).name, "Q4_0-imatrix");
        assert_eq!(a.made(dir, "Q4_0", None).name, "Q4_0");
    }

    #[test]
    fn gguf_bits_count_each_tensor_type() {
        // A real llama.cpp file is not in CI; the SmolLM2 GGUF is checked when present.
        let gguf = adadim_load::fetch::adadim_home().join("models/smollm2.gguf");
        if !gguf.exists() {
            eprintln!("skipped: {} not present", gguf.display());
            return;
        }
        let (bits, weights) = gguf_bits(&gguf).unwrap();
        // Q4_1: 20 bytes per 32 values = 5 bits; 30 blocks of SmolLM2's linears.
        assert_eq!(weights, 30 * (576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536));
        assert_eq!(bits, weights * 5);
    }

    #[test]
    fn a_refusal_for_want_of_an_imatrix_is_told_from_other_failures() {
        let out = |stderr: &str| Output {
            status: std::process::ExitStatus::from_raw(1 << 8),
            stdout: Vec::new(),
            stderr: stderr.as_bytes().to_vec(),
        };
        assert!(refused_for_imatrix(&out("ERROR: this quantization requires an importance matrix!\n")));
        assert!(refused_for_imatrix(&out("failed to quantize: this quantization requires an imatrix!")));
        assert!(!refused_for_imatrix(&out("failed to quantize: unknown model architecture")));
        let e = tool_failed("llama-quantize Q9_K", &out("a\nb\ninvalid ftype Q9_K")).to_string();
        assert!(e.contains("llama-quantize Q9_K failed") && e.contains("invalid ftype Q9_K"), "{e}");
    }

    #[test]
    fn the_frontier_figure_has_a_panel_per_text_with_every_point_it_can_draw() {
        let d = tempfile::tempdir().unwrap();
        let pt = |name: &str, bpw: f64, w: f64, p: f64| FrontierPoint {
            name: name.into(),
            bpw,
            ppl: [("wikitext2".to_string(), w), ("ptb".to_string(), p)].into(),
        };
        let fp: BTreeMap<String, f64> = [("wikitext2".to_string(), 19.2), ("ptb".to_string(), 44.6)].into();
        let ours = Frontier {
            fp,
            points: vec![pt("bpw3.25", 3.25, 33.0, 77.0), pt("bpw4.0", 4.0, 23.0, 54.0)],
            not_made: vec![],
        };
        // IQ1_S is broken beyond the plot's range on both texts: left out.
        let llama = Frontier {
            fp: BTreeMap::new(),
            points: vec![pt("IQ3_XXS", 4.14, 22.8, 52.0), pt("Q4_0", 4.5, 24.2, 55.0), pt("IQ1_S", 2.0, 900.0, 2000.0)],
            not_made: vec![],
        };
        let ds: Vec<Dataset> = ["wikitext2", "ptb"]
            .iter()
            .map(|l| Dataset { label: l.to_string(), path: PathBuf::from(format!("{l}.txt")) })
            .collect();
        let path = d.path().join("f.svg");
        plot_frontier(&ours, &llama, &ds, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("wikitext2 perplexity") && svg.contains("ptb perplexity"));
        assert!(svg.contains("FP 19.20") && svg.contains("FP 44.60"));
        // Per panel: four points and the legend's two marks.
        assert_eq!(svg.matches("<circle").count(), 2 * (4 + 2));
        // A text the --ours file has no FP for is a clear error.
        let mut only_w = ours.clone();
        only_w.fp.remove("ptb");
        let e = plot_frontier(&only_w, &llama, &ds, &path).unwrap_err().to_string();
        assert!(e.contains("no FP perplexity for ptb"), "{e}");
    }
}

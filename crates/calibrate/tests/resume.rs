//! The resumable driver: a run cut short after any block and resumed writes the bytes of a run
//! never interrupted, in every output format; a work directory of another job is refused.
#![allow(clippy::result_large_err)] // the interrupted runs' results travel through catch_unwind once

use adadim_calibrate::{
    quantize_model, quantize_model_resumable, CalibError, Dim, Format, Method, Output, QuantizeConfig, Select, WorkDir,
};
use adadim_load::synth::{tiny_config, write_random_checkpoint, Rng};
use adadim_load::Checkpoint;
use adadim_quantize::{Axis, GptqOptions, QuantSpec, Zero};
use std::path::Path;

fn config(method: Method, dim: Dim, act_order: bool) -> QuantizeConfig {
    QuantizeConfig {
        method,
        dim,
        select: Select::Rtn,
        spec: QuantSpec {
            bits: 3,
            group: Some(16),
            axis: Axis::Oc,
            zero: if act_order { Zero::Sym } else { Zero::Awq },
        },
        search: adadim_quantize::ScaleSearch::MinMax,
        gptq: GptqOptions::default(),
        act_order,
        static_groups: false,
        group_aware: false,
        awq: false,
        refit: false,
        descend: 0,
        qep: None,
        ada_error: adadim_calibrate::AdaError::Linear,
        ic_modules: vec![],
        act_cache_bytes: adadim_calibrate::ACT_CACHE_BYTES,
        budget: None,
        layouts: Default::default(),
    }
}

fn samples() -> Vec<Vec<u32>> {
    let mut rng = Rng::new(5);
    (0..5).map(|_| (0..20).map(|_| (rng.next_u64() % 300) as u32).collect()).collect()
}

fn output(path: &Path, format: Format) -> Output<'_> {
    Output { path, format, metadata: serde_json::json!({"method": "test"}) }
}

#[test]
fn interrupted_after_any_block_resumes_to_the_same_bytes() {
    // The interruptions below are panics in the progress callback: keep them quiet.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !info.payload().downcast_ref::<String>().is_some_and(|m| m.starts_with("interrupted after block")) {
            default_hook(info);
        }
    }));
    let d = tempfile::tempdir().unwrap();
    let mut c = tiny_config();
    c.num_hidden_layers = 3;
    write_random_checkpoint(&d.path().join("m"), &c, 11).unwrap();
    let ck = Checkpoint::open(&d.path().join("m")).unwrap();
    let cases = [
        (Method::Gptq, Dim::Ada, false, Format::Packed),
        (Method::Gptq, Dim::Oc, true, Format::Packed), // act-order: a g_idx to save and restore
        (Method::Gptq, Dim::Ada, false, Format::F32),
        (Method::Gptq, Dim::Ic, false, Format::F16),
        (Method::Gptq, Dim::Oc, true, Format::Gptq),
        (Method::Rtn, Dim::Oc, false, Format::F32), // no calibration: no hidden states saved
        (Method::Gptq, Dim::Oc, false, Format::Packed), // with AWQ (below): scales folded into norms and rows
        (Method::Gptq, Dim::Ada, true, Format::Packed), // --bpw (below): the damage table saved and reused
        (Method::Gptq, Dim::Ada, true, Format::Packed), // --qep and --refit (below): the float stream recomputed
    ];
    let (awq_case, bpw_case, qep_case) = (cases.len() - 3, cases.len() - 2, cases.len() - 1);
    for (i, (method, dim, act, format)) in cases.into_iter().enumerate() {
        let budget = adadim_calibrate::damage::Budget {
            bpw: 3.4,
            damage: adadim_calibrate::damage::DamageModel::Stream,
            bits: vec![2, 3, 4],
            groups: vec![8, 16],
            axes: vec![Axis::Oc, Axis::Ic],
            float_min: true,
        };
        let cfg = QuantizeConfig {
            awq: i == awq_case,
            budget: (i == bpw_case).then_some(budget),
            qep: (i == qep_case).then_some(0.5),
            refit: i == qep_case,
            ..config(method, dim, act)
        };
        let want_file = d.path().join(format!("want{i}.safetensors"));
        let want = quantize_model(&ck, &samples(), &cfg, &output(&want_file, format), &mut |_, _| {}).unwrap();
        let want_bytes = std::fs::read(&want_file).unwrap();
        let job = serde_json::json!({"case": i});
        let work_dir = d.path().join(format!("work{i}"));
        let got_file = d.path().join(format!("got{i}.safetensors"));
        // Uninterrupted, then stopped after each block in turn (after the last: before the
        // output is written) and resumed.
        for stop in 0..=c.num_hidden_layers {
            let _ = std::fs::remove_file(&got_file); // writers never overwrite
            let mut work = WorkDir::open(&work_dir, job.clone(), false).unwrap();
            assert_eq!(work.done(), 0);
            if stop > 0 {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    quantize_model_resumable(
                        &ck,
                        &samples(),
                        &cfg,
                        &output(&got_file, format),
                        &mut work,
                        &mut |done, _| {
                            if done == stop {
                                panic!("interrupted after block {done}");
                            }
                        },
                    )
                }));
                assert!(r.is_err());
                drop(work);
                work = WorkDir::open(&work_dir, job.clone(), false).unwrap();
                assert_eq!(work.done(), stop, "case {i}");
            }
            let mut seen = Vec::new();
            let run = quantize_model_resumable(
                &ck,
                &samples(),
                &cfg,
                &output(&got_file, format),
                &mut work,
                &mut |done, _| seen.push(done),
            )
            .unwrap();
            assert_eq!(seen, (stop + 1..=c.num_hidden_layers).collect::<Vec<_>>());
            assert!(
                std::fs::read(&got_file).unwrap() == want_bytes,
                "case {i} ({method:?} {dim:?} {format:?}), stopped after {stop} blocks: bytes differ"
            );
            // The reports of blocks done before the interruption come back too, the same.
            // So do their input-channel RMS vectors (saved beside the reports, not in their JSON).
            let strip = |r: &adadim_calibrate::LinearReport| {
                (
                    r.layer,
                    r.module,
                    r.axis,
                    r.oc_error,
                    r.ic_error,
                    r.final_error,
                    r.gptq_loss,
                    r.percdamp,
                    r.dead_inputs,
                    r.input_rms.clone(),
                    r.awq_alpha,
                    r.awq_scales.clone(),
                )
            };
            assert_eq!(
                run.linears.iter().map(strip).collect::<Vec<_>>(),
                want.linears.iter().map(strip).collect::<Vec<_>>()
            );
            let calibrated = method == Method::Gptq;
            assert!(
                run.linears.iter().all(|r| r.input_rms.len() == if calibrated { r.cols } else { 0 }),
                "case {i}: input_rms lengths"
            );
            assert_eq!(run.timings.forward_flops, want.timings.forward_flops);
            if i == awq_case {
                // q/k/v and gate/up always take the scales (their norm absorbs any).
                let with = run.linears.iter().filter(|r| r.awq_alpha.is_some() && r.awq_scales.len() == r.cols).count();
                assert!(with >= 5 * c.num_hidden_layers, "case {i}: {with} linears with AWQ scales");
            }
            if i == bpw_case {
                // The same allocation, whether the table was measured or read back.
                let (a, b) = (run.allocation.clone().unwrap(), want.allocation.clone().unwrap());
                assert_eq!((a.bpw, a.damage), (b.bpw, b.damage), "case {i}, stopped after {stop}");
                assert!(a.bpw <= 3.4);
                let layouts =
                    |r: &[adadim_calibrate::LinearReport]| r.iter().map(|r| r.layout.clone()).collect::<Vec<_>>();
                assert_eq!(layouts(&run.linears), layouts(&want.linears));
            }
            work.remove().unwrap();
            assert!(!work_dir.exists());
        }
    }
}

#[test]
fn a_work_directory_of_another_job_is_refused_unless_restarted() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join(".q.partial");
    let job = |bits: u8| serde_json::json!({"settings": {"bits": bits, "group": 16}, "tool": "adadim 0"});
    drop(WorkDir::open(&dir, job(3), false).unwrap());
    assert!(!dir.join("lock").exists(), "the lock goes with the WorkDir");
    let e = WorkDir::open(&dir, job(4), false).err().expect("another job");
    assert!(matches!(e, CalibError::OtherJob { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(".q.partial")
            && msg.contains("settings.bits: 3 -> 4")
            && msg.contains("--restart")
            && !msg.contains("group"),
        "{msg}"
    );
    assert!(dir.join("resume.json").exists(), "a refused run leaves the other job's state alone");
    let w = WorkDir::open(&dir, job(4), true).unwrap();
    assert_eq!(w.done(), 0);
    drop(w);
    WorkDir::open(&dir, job(4), false).unwrap().remove().unwrap();
    // A damaged manifest is an error naming it, not a silent restart.
    drop(WorkDir::open(&dir, job(4), false).unwrap());
    std::fs::write(dir.join("resume.json"), b"{\"layout_version\": 1, \"job").unwrap();
    let msg = WorkDir::open(&dir, job(4), false).err().expect("damaged").to_string();
    assert!(msg.contains("resume.json") && msg.contains("delete"), "{msg}");
}

/// Saved state is verified before it is trusted: one byte flipped in a finished block's file,
/// or in the saved hidden states, is refused with a message naming the file.
#[test]
fn a_damaged_block_or_hidden_state_is_refused_not_resumed() {
    let d = tempfile::tempdir().unwrap();
    let mut c = tiny_config();
    c.num_hidden_layers = 3;
    write_random_checkpoint(&d.path().join("m"), &c, 5).unwrap();
    let ck = Checkpoint::open(&d.path().join("m")).unwrap();
    let cfg = config(Method::Gptq, Dim::Ada, false);
    let job = serde_json::json!({"case": "damaged"});
    let work_dir = d.path().join(".w.partial");
    for victim in ["blocks/block-00000.safetensors", "hidden-00002.f32"] {
        let mut work = WorkDir::open(&work_dir, job.clone(), true).unwrap();
        let out = d.path().join("out.safetensors");
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            quantize_model_resumable(&ck, &samples(), &cfg, &output(&out, Format::Packed), &mut work, &mut |done, _| {
                assert!(done < 2, "interrupted after block {done}")
            })
        }));
        assert!(r.is_err());
        drop(work);
        let p = work_dir.join(victim);
        let mut bytes = std::fs::read(&p).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        let e = match WorkDir::open(&work_dir, job.clone(), false) {
            Err(e) => e.to_string(),
            Ok(mut work) => quantize_model_resumable(
                &ck,
                &samples(),
                &cfg,
                &output(&out, Format::Packed),
                &mut work,
                &mut |_, _| {},
            )
            .map(|_| ())
            .expect_err("damaged state must be refused")
            .to_string(),
        };
        assert!(
            e.contains(victim.rsplit('/').next().unwrap()) && e.contains("SHA-256") && e.contains("damaged"),
            "{e}"
        );
        assert!(!out.exists());
    }
}

/// A link planted where the work directory goes is refused; what it points to is untouched.
#[test]
fn a_link_at_the_work_directory_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let victim = d.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("thesis.txt"), "x").unwrap();
    std::fs::write(victim.join("resume.json"), "{}").unwrap();
    let link = d.path().join(".o.partial");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    for restart in [false, true] {
        let e = WorkDir::open(&link, serde_json::json!({}), restart).err().expect("a link").to_string();
        assert!(e.contains(".o.partial") && e.contains("symbolic link"), "{e}");
    }
    // A real directory of other files is refused the same way, even with --restart.
    let e = WorkDir::open(&victim, serde_json::json!({}), true).err().expect("foreign").to_string();
    assert!(e.contains("did not write"), "{e}");
    assert_eq!(std::fs::read_to_string(victim.join("thesis.txt")).unwrap(), "x");
}

/// The one file a manifest names outside `blocks/` (the hidden states) is only ever the name
/// the run gives it: an edited `resume.json` naming a file outside the work directory (with its
/// size and checksum, so that it reads back as valid state) is refused, and that file is kept.
/// Before this was checked, the resumed run read it as the hidden states and deleted it as
/// superseded once the next block was saved.
#[test]
fn a_manifest_naming_a_file_outside_the_work_directory_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let mut c = tiny_config();
    c.num_hidden_layers = 3;
    write_random_checkpoint(&d.path().join("m"), &c, 7).unwrap();
    let ck = Checkpoint::open(&d.path().join("m")).unwrap();
    let cfg = config(Method::Gptq, Dim::Ada, false);
    let job = serde_json::json!({"case": "hidden outside"});
    let work_dir = d.path().join(".h.partial");
    let out = d.path().join("out.safetensors");
    let mut work = WorkDir::open(&work_dir, job.clone(), false).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        quantize_model_resumable(&ck, &samples(), &cfg, &output(&out, Format::Packed), &mut work, &mut |done, _| {
            assert!(done < 1, "interrupted after block {done}")
        })
    }));
    assert!(r.is_err());
    drop(work);
    // A file of the user's, outside, with the size and checksum the hidden states would have.
    let victim = d.path().join("thesis.bin");
    std::fs::copy(work_dir.join("hidden-00001.f32"), &victim).unwrap();
    let manifest = work_dir.join("resume.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    let sha = m["files"]["hidden-00001.f32"].clone();
    for name in [victim.to_string_lossy().into_owned(), "../thesis.bin".to_string()] {
        m["hidden"] = name.clone().into();
        m["files"][&name] = sha.clone();
        std::fs::write(&manifest, serde_json::to_vec(&m).unwrap()).unwrap();
        let e = match WorkDir::open(&work_dir, job.clone(), false) {
            Err(e) => e.to_string(),
            Ok(mut work) => match quantize_model_resumable(
                &ck,
                &samples(),
                &cfg,
                &output(&out, Format::Packed),
                &mut work,
                &mut |_, _| {},
            ) {
                Err(e) => e.to_string(),
                Ok(_) => String::new(),
            },
        };
        assert!(victim.exists(), "{name}: the file outside the work directory was deleted");
        assert!(e.contains("resume.json") && e.contains("hidden-00001.f32"), "{name}: {e}");
    }
}

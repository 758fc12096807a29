//! Seeded matvec cases as a shared library, for `tests/avx512_emulated.py`: the test loads it
//! into Python beside an emulated x86 CPU that has AVX-512 (bochscpu), runs [`case_run`] on the
//! emulated CPU with the AVX-512 kernels switched on ([`adadim_pack::simd::assume_avx512`])
//! and checks what it wrote with [`case_check`] natively. Not a tool: the C functions below are
//! the test's interface, nothing more.

use std::ffi::c_char;

use adadim_load::synth::Rng;
use adadim_pack::{matvec_i16 as q16, matvec_i8 as q8, ActBits, PackedLinear};
use adadim_quantize::{rtn, Axis, QuantSpec, Zero};

/// Every allocation of this library from one static arena, by bumping an offset: no lock and
/// no system call, which an emulated call cannot make (glibc's `malloc` locks its arena for
/// blocks past its per-thread cache, and bochscpu crashed the process on that lock). Freed
/// blocks are not reused: the test allocates a few megabytes in all; past the arena,
/// the system allocator.
struct Bump;

const ARENA_BYTES: usize = 256 << 20;

#[repr(C, align(64))]
struct Arena(std::cell::UnsafeCell<[u8; ARENA_BYTES]>);

// SAFETY: disjoint ranges are handed out by an atomic offset.
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena(std::cell::UnsafeCell::new([0; ARENA_BYTES]));
static USED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

// SAFETY: each block is a range of the arena no other block overlaps (reserved with its
// alignment slack by one atomic add), or the system allocator's.
unsafe impl std::alloc::GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let need = layout.size() + layout.align();
        let start = USED.fetch_add(need, std::sync::atomic::Ordering::Relaxed);
        if start + need > ARENA_BYTES {
            return std::alloc::System.alloc(layout);
        }
        let base = ARENA.0.get() as *mut u8;
        let p = base.add(start);
        p.add(p.align_offset(layout.align()))
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: std::alloc::Layout) {
        let base = ARENA.0.get() as *mut u8;
        if !(base..base.add(ARENA_BYTES)).contains(&p) {
            std::alloc::System.dealloc(p, layout);
        }
    }
}

#[global_allocator]
static ALLOC: Bump = Bump;

pub struct Case {
    name: String,
    p: PackedLinear,
    /// Tokens multiplied together ([`PackedLinear::matvec_batch`] where more than one).
    t: usize,
    /// The activations' rounding: int16 ([`q16`]) or int8 ([`q8`]).
    act: ActBits,
    x: Vec<f32>,
    y: Vec<f32>,
    /// The product's definition on the same rounded activations, and the f32 round-off allowed.
    want: Vec<f64>,
    tol: Vec<f64>,
}

pub struct Cases(Vec<Case>);

/// Every case: 2-, 3-, 4- and 8-bit codes, both axes, groups of 32, 64, 128 and 256 (two blocks a group),
/// rows of an odd number of steps (a lone last step), of one step, and with a tail of codes
/// after the last step; short rows (four at a time, a lone row after them where the count is
/// not a multiple of four; 1536 codes in groups of 32 is the most blocks a four-row pass takes)
/// and long ones (2752 codes: one at a time); each on int16 and on
/// int8 activations; the short ones also as a batch of 5 tokens (four rows of four tokens at
/// once, then of one).
#[no_mangle]
pub extern "C" fn cases_new() -> *mut Cases {
    let mut rng = Rng::new(512);
    // The batches' other tokens from a generator of their own: the single cases draw what
    // they drew before.
    let mut more = Rng::new(513);
    let mut list = Vec::new();
    // 2-bit codes last: the earlier cases draw the weights they drew before.
    for bits in [3u8, 4, 8, 2] {
        for (axis, group) in [(Axis::Oc, 128), (Axis::Oc, 256), (Axis::Oc, 64), (Axis::Oc, 32), (Axis::Ic, 128)] {
            for (rows, cols) in [(48, 576), (40, 1536), (33, 200), (16, 64), (24, 320), (10, 2752)] {
                let spec = QuantSpec {
                    bits,
                    group: Some(group),
                    axis,
                    zero: if rows % 2 == 0 { Zero::Awq } else { Zero::Sym },
                };
                let mut w = rng.normals(rows * cols, 0.05);
                for r in 0..rows {
                    w[r * cols + cols / 3] *= 20.0;
                }
                let q = rtn(&w, rows, cols, &spec).expect("a valid spec");
                let p = PackedLinear::from_quantized(&q);
                let x = rng.normals(cols, 1.0);
                let (_, scale) = adadim_pack::matvec_f32::matvec_ref(&p, &x);
                // The kernels sum codes times activations and take the zero-point term from it:
                // where most of a row's weights sit at its zero point (its outlier sets the
                // scale; 2-bit codes have little room) the two nearly cancel, and the f32
                // round-off follows the zero term's size rather than the result's.
                let zero_term = |r: usize| -> f64 {
                    (0..cols)
                        .map(|c| {
                            let g = q.params(r, c);
                            f64::from(g.scale * g.zero * x[c]).abs()
                        })
                        .sum()
                };
                let tol: Vec<f64> = scale
                    .iter()
                    .enumerate()
                    .map(|(r, s)| {
                        1e-6 * (cols as f64).sqrt() * (f64::from(spec.maxq()) * s).max(zero_term(r)).max(1e-30)
                    })
                    .collect();
                // int8 where its kernel takes the layout (per-OC groups of whole steps).
                for act in [ActBits::I16, ActBits::I8].into_iter().filter(|&a| a == ActBits::I16 || q8::supported(&p)) {
                    let (want, _) = if act == ActBits::I16 { q16::matvec_ref(&p, &x) } else { q8::matvec_ref(&p, &x) };
                    let name = format!("{rows}x{cols} w{bits} {axis:?} g{group} {:?} int{}", spec.zero, act.bits());
                    list.push(Case {
                        name: name.clone(),
                        p: p.clone(),
                        t: 1,
                        act,
                        x: x.clone(),
                        y: vec![f32::NAN; rows],
                        want,
                        tol: tol.clone(),
                    });
                    if cols > 2000 {
                        continue;
                    }
                    // Tokens 1..5 of a batch: their tolerance scaled by their own product's.
                    let t = 5;
                    let mut xb = x.clone();
                    xb.extend(more.normals((t - 1) * cols, 1.0));
                    let (mut want, mut tols) = (Vec::new(), Vec::new());
                    for x in xb.chunks(cols) {
                        let (w, _) = if act == ActBits::I16 { q16::matvec_ref(&p, x) } else { q8::matvec_ref(&p, x) };
                        let (_, s) = adadim_pack::matvec_f32::matvec_ref(&p, x);
                        want.extend(w);
                        tols.extend(tol.iter().zip(&scale).zip(s).map(|((t, s0), s)| t * (s / s0.max(1e-30)).max(1.0)));
                    }
                    list.push(Case {
                        name: format!("{name} batch of {t}"),
                        p: p.clone(),
                        t,
                        act,
                        x: xb,
                        y: vec![f32::NAN; t * rows],
                        want,
                        tol: tols,
                    });
                }
            }
        }
    }
    Box::into_raw(Box::new(Cases(list)))
}

/// # Safety
/// `c` from [`cases_new`].
#[no_mangle]
pub unsafe extern "C" fn cases_len(c: *const Cases) -> usize {
    (&*c).0.len()
}

/// Case `i`'s matvec (or batched matvec) into its `y`, every loop on this thread ([`adadim_team::serial`]:
/// an emulated call has no other threads and no operating system).
///
/// # Safety
/// `c` from [`cases_new`], `i < cases_len(c)`.
#[no_mangle]
pub unsafe extern "C" fn case_run(c: *mut Cases, i: usize) {
    let case = &mut (&mut *c).0[i];
    adadim_team::serial(|| match case.t {
        1 => case.p.matvec(case.act, &case.x, &mut case.y),
        t => case.p.matvec_batch(case.act, &case.x, t, &mut case.y),
    });
}

/// Where [`case_run`] starts, for the emulator.
#[no_mangle]
pub extern "C" fn case_run_address() -> usize {
    case_run as *const () as usize
}

/// Fills case `i`'s `y` with NaN, so a run that writes nothing cannot pass.
///
/// # Safety
/// As [`case_run`].
#[no_mangle]
pub unsafe extern "C" fn case_reset(c: *mut Cases, i: usize) {
    (&mut *c).0[i].y.fill(f32::NAN);
}

/// 0 when case `i`'s `y` is its definition within round-off; else 1 and a message naming the
/// case and row in `msg` (NUL-terminated, at most `cap` bytes).
///
/// # Safety
/// As [`case_run`]; `msg` has `cap >= 1` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn case_check(c: *const Cases, i: usize, msg: *mut c_char, cap: usize) -> i32 {
    let case = &(&*c).0[i];
    let bad = case
        .y
        .iter()
        .zip(&case.want)
        .zip(&case.tol)
        .enumerate()
        .find(|(_, ((&y, &w), &t))| (f64::from(y) - w).abs().partial_cmp(&t).is_none_or(|o| o.is_gt()));
    let text = match bad {
        None => format!("{}: {} rows within round-off", case.name, case.y.len()),
        Some((r, ((y, w), t))) => format!("{} row {r}: {y} vs {w} (tol {t:.3e})", case.name),
    };
    let n = text.len().min(cap - 1);
    std::ptr::copy_nonoverlapping(text.as_ptr(), msg as *mut u8, n);
    *msg.add(n) = 0;
    i32::from(bad.is_some())
}

/// Switches the AVX-512 kernels on for every later call (the emulated CPU has them).
#[no_mangle]
pub extern "C" fn assume_avx512() {
    // SAFETY: after this, the test runs kernels only on the emulated CPU, which has AVX-512.
    unsafe { adadim_pack::simd::assume_avx512() };
}

/// The calling thread's FS base (its thread-local storage), for the emulated CPU's FS.
#[cfg(target_arch = "x86_64")]
#[no_mangle]
pub extern "C" fn fs_base() -> usize {
    let base: usize;
    // SAFETY: on x86-64 Linux the thread control block starts with a pointer to itself.
    unsafe { std::arch::asm!("mov {}, fs:0", out(reg) base) };
    base
}

extern "C" {
    fn strtoull(s: *const c_char, end: *mut *mut c_char, base: i32) -> u64;
}

/// The bochscpu wheel was linked against glibc 2.38, which renamed `strtoull` for C23; older
/// glibc (Debian 12 has 2.36) lacks the name, so this library, loaded first and global,
/// provides it.
///
/// # Safety
/// As `strtoull`.
#[no_mangle]
pub unsafe extern "C" fn __isoc23_strtoull(s: *const c_char, end: *mut *mut c_char, base: i32) -> u64 {
    strtoull(s, end, base)
}

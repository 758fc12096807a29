//! # adadim-team
//!
//! A team of spinning helpers for the many small parallel loops of decoding (the packed
//! matvecs' row loops, decode attention, dense matvecs), shared by the model and the runtime.
//!
//! Why not rayon alone: one decoded token is hundreds of matvecs of a few microseconds each,
//! separated by serial work; an idle rayon worker goes to sleep between them and waking it
//! costs about as much as a matvec. [`with_team`] turns the pool's idle workers into helpers
//! that spin for the length of a closure (a decode loop); [`for_each_chunk`], [`rows`] and
//! [`grouped_rows`] run on them (outside a team: on rayon as before). Each member takes one
//! contiguous run of chunks, so each core's prefetcher keeps its stream.
//!
//! The protocol, one job at a time: the leader (the thread that called [`with_team`]) writes
//! the job, opens the gate (an odd value, SeqCst) and works on the tasks itself; a helper
//! that sees the gate open counts itself `inside`, checks the gate again and only then reads
//! the job, taking task indices from a shared counter. The leader closes the gate when no
//! task is left and waits until nobody is `inside`: a helper that counted itself in before
//! the close is waited for, one that did after it sees the closed gate and leaves without
//! touching the job (the SeqCst order of the two stores and two loads makes one of the two
//! hold). So the job, borrowed from the leader's stack, is never used after [`for_each`]
//! returns.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};

type Job = dyn Fn(usize) + Sync;

struct Shared {
    /// The current job (valid while the gate is open and for whoever is inside).
    job: std::cell::UnsafeCell<Option<&'static Job>>,
    tasks: AtomicUsize,
    next: AtomicUsize,
    /// Odd while a job is open.
    gate: AtomicUsize,
    inside: AtomicUsize,
    stop: AtomicBool,
    /// Helpers that joined (enrolment), then [`CLOSED`].
    enrolled: AtomicUsize,
    /// Threads in the team, the leader included.
    members: AtomicUsize,
    /// A helper's task panicked (the leader panics in its place).
    panicked: AtomicBool,
}

// SAFETY: `job` is written only by the leader while the gate is closed and nobody is inside,
// and read only by helpers inside an open gate (see the module's protocol).
unsafe impl Sync for Shared {}

thread_local! {
    static TEAM: Cell<Option<*const Shared>> = const { Cell::new(None) };
    /// Set by [`serial`].
    static SERIAL: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with the parallel loops of this module ([`for_each_chunk`], the kernels' row
/// loops) run in order on this thread: no other thread and no system call takes part, as an
/// emulator running one call of a kernel needs (the tests' `avx512_emulated`).
pub fn serial<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SERIAL.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SERIAL.with(|s| s.replace(true)));
    f()
}

fn is_serial() -> bool {
    SERIAL.with(Cell::get)
}

/// Runs `f` on this thread with up to `helpers` of rayon's idle workers spinning, ready to
/// take [`for_each`] tasks from it (those not free within [`ENROL_WAIT`] sit it out). With no
/// helpers (one thread), or inside another team, `f` just runs.
pub fn with_team<R>(helpers: usize, f: impl FnOnce() -> R) -> R {
    if helpers == 0 || TEAM.with(|t| t.get().is_some()) {
        return f();
    }
    let shared = Shared {
        job: std::cell::UnsafeCell::new(None),
        tasks: AtomicUsize::new(0),
        next: AtomicUsize::new(0),
        gate: AtomicUsize::new(0),
        inside: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        enrolled: AtomicUsize::new(0),
        members: AtomicUsize::new(1),
        panicked: AtomicBool::new(false),
    };
    let s = &shared;
    // The helpers are rayon jobs, so they run on the pool's idle workers instead of beside
    // them (a separate thread competed for the core with a rayon worker spinning idle).
    rayon::in_place_scope(|scope| {
        for _ in 0..helpers {
            scope.spawn(move |_| {
                // Enrol unless enrolment is over (a job started late, possibly inline by the
                // leader while it waits on something: it must return at once).
                let mut n = s.enrolled.load(SeqCst);
                loop {
                    if n == CLOSED {
                        return;
                    }
                    match s.enrolled.compare_exchange(n, n + 1, SeqCst, SeqCst) {
                        Ok(_) => break,
                        Err(now) => n = now,
                    }
                }
                helper(s);
            });
        }
        // Wait for the idle workers to take their jobs; whoever has not by then sits this
        // team out. The leader does nothing else meanwhile, so no job of `f` is under way
        // that a late helper could block (see `CLOSED`).
        let t = std::time::Instant::now();
        while s.enrolled.load(SeqCst) < helpers && t.elapsed() < ENROL_WAIT {
            std::hint::spin_loop();
        }
        let joined = s.enrolled.swap(CLOSED, SeqCst);
        s.members.store(joined + 1, SeqCst);
        // Stops the helpers and leaves the thread without a team however `f` ends (the scope
        // then waits for the helper jobs to return).
        struct Dismiss<'a>(&'a Shared);
        impl Drop for Dismiss<'_> {
            fn drop(&mut self) {
                TEAM.with(|t| t.set(None));
                self.0.stop.store(true, SeqCst);
            }
        }
        let _dismiss = Dismiss(s);
        TEAM.with(|t| t.set(Some(s as *const Shared)));
        f()
    })
}

/// How long [`with_team`] waits for its helpers to enrol: a sleeping rayon worker on a
/// virtual machine can take milliseconds to wake, and a team without its helper runs at one
/// thread's speed for its whole life. Waiting costs nothing when the helpers come at once.
pub const ENROL_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// `enrolled` once enrolment is over.
const CLOSED: usize = usize::MAX;

fn helper(s: &Shared) {
    let mut seen = 0;
    loop {
        let g = loop {
            let g = s.gate.load(SeqCst);
            if g != seen && g % 2 == 1 {
                break g;
            }
            if s.stop.load(Relaxed) {
                return;
            }
            std::hint::spin_loop();
        };
        seen = g;
        s.inside.fetch_add(1, SeqCst);
        if s.gate.load(SeqCst) == g {
            // SAFETY: the gate is open and we are counted inside: the leader keeps the job
            // alive and unchanged until we leave.
            if let Some(job) = unsafe { *s.job.get() } {
                let n = s.tasks.load(Relaxed);
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loop {
                    let i = s.next.fetch_add(1, Relaxed);
                    if i >= n {
                        break;
                    }
                    job(i);
                }));
                if run.is_err() {
                    s.panicked.store(true, SeqCst);
                }
            }
        }
        s.inside.fetch_sub(1, SeqCst);
    }
}

/// Threads in this thread's team (1 without one).
fn members() -> usize {
    // SAFETY: as in `for_each`.
    TEAM.with(|t| t.get()).map_or(1, |s| unsafe { (*s).members.load(Relaxed) })
}

/// Runs `f(0..n)` on this thread's team (each index once, in any order, on any member), and
/// returns true; false (nothing run) when this thread leads no team or is inside one of its
/// tasks already.
pub fn for_each(n: usize, f: &(dyn Fn(usize) + Sync)) -> bool {
    let Some(s) = TEAM.with(|t| t.get()) else { return false };
    // SAFETY: the pointer was set by `with_team` on this thread and is cleared before the
    // team is dropped.
    let s = unsafe { &*s };
    if s.gate.load(SeqCst) % 2 == 1 {
        // Called from inside a task of this team (only the leader moves the gate): a second
        // job cannot open while one is; the caller runs its loop another way.
        return false;
    }
    // SAFETY: lifetime erased for the helpers; the protocol ends every use before we return.
    let job: &'static Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync + '_), &'static Job>(f) };
    // SAFETY: the gate is closed and nobody is inside (the previous call waited for that).
    unsafe { *s.job.get() = Some(job) };
    s.tasks.store(n, Relaxed);
    s.next.store(0, Relaxed);
    s.gate.fetch_add(1, SeqCst); // open
                                 // A panic here must not leave before the helpers are out of the job: caught, re-raised.
    let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loop {
        let i = s.next.fetch_add(1, Relaxed);
        if i >= n {
            break;
        }
        f(i);
    }));
    // Whatever is left after a panic is abandoned: no new task starts once the counter is past.
    s.next.store(usize::MAX / 2, Relaxed);
    s.gate.fetch_add(1, SeqCst); // closed
    while s.inside.load(SeqCst) != 0 {
        std::hint::spin_loop();
    }
    // SAFETY: closed and empty.
    unsafe { *s.job.get() = None };
    if let Err(p) = mine {
        std::panic::resume_unwind(p);
    }
    if s.panicked.swap(false, SeqCst) {
        panic!("a task of the decode team panicked");
    }
    true
}

/// `f(i, chunk)` for each `chunk` of `len` rows of `y` (the last may be short): on this
/// thread's team when it leads one, else with rayon.
pub fn for_each_chunk(y: &mut [f32], len: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
    let total = y.len();
    let base = SendPtr(y.as_mut_ptr());
    let chunk = |i: usize| {
        let start = i * len;
        // SAFETY: chunks are disjoint and inside `y`, which outlives the call.
        f(i, unsafe { std::slice::from_raw_parts_mut(base.get().add(start), len.min(total - start)) });
    };
    // On a team, each member takes one contiguous run of chunks (interleaved chunks made
    // each core's stream jump every chunk, and the prefetchers lost it).
    let chunks = total.div_ceil(len);
    if is_serial() {
        (0..chunks).for_each(chunk);
        return;
    }
    let parts = members().min(chunks).max(1);
    let part = |p: usize| (p * chunks / parts..(p + 1) * chunks / parts).for_each(chunk);
    if !for_each(parts, &part) {
        use rayon::prelude::*;
        y.par_chunks_mut(len).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// Rows per parallel task of the matvec kernels.
pub const ROWS_PER_TASK: usize = 32;

/// `run(r0, chunk)` for runs of rows of `y` ([`ROWS_PER_TASK`] long, the last may be short;
/// `r0` the first row's index), in parallel (team or rayon). A kernel called per run, not per
/// row, keeps its row loop inside its own SIMD function, where the row's kernel is inlined and
/// what every row shares is worked out once.
pub fn rows(y: &mut [f32], run: &(dyn Fn(usize, &mut [f32]) + Sync)) {
    for_each_chunk(y, ROWS_PER_TASK, &|t, c| run(t * ROWS_PER_TASK, c));
}

/// `run(r0, chunk, slot)` for runs of rows of `y`, each inside one group `kr` of `g` rows,
/// `slot` filled by `prep(kr, slot)` for that group (per-IC: the group's rounded activations),
/// in parallel. The slots are the caller's and may hold the last call's values, so their
/// buffers are reused (fresh buffers per call made the allocator fault pages in again). On a
/// team each member takes one contiguous run of rows with a slot of its own and fills it for
/// each group its run reaches just before that group's rows (in cache for them); a group split
/// between two members is filled by both (the same values). On rayon a task per group fills
/// its slot and hands its rows out in turn.
pub fn grouped_rows<P: Send + Sync>(
    y: &mut [f32],
    g: usize,
    slots: &mut [P],
    prep: &(dyn Fn(usize, &mut P) + Sync),
    run: &(dyn Fn(usize, &mut [f32], &P) + Sync),
) {
    let groups = y.len().div_ceil(g);
    assert!(slots.len() >= groups, "{} slots for {groups} row groups", slots.len());
    if is_serial() {
        for (kr, (y, p)) in y.chunks_mut(g).zip(slots.iter_mut()).enumerate() {
            prep(kr, p);
            run(kr * g, y, p);
        }
        return;
    }
    let total = y.len();
    let chunks = total.div_ceil(ROWS_PER_TASK);
    let parts = members().min(chunks).min(slots.len()).max(1);
    let (yb, sb) = (SendPtr(y.as_mut_ptr()), SendPtr(slots.as_mut_ptr()));
    let part = |i: usize| {
        let (mut r, end) =
            ((i * chunks / parts * ROWS_PER_TASK).min(total), ((i + 1) * chunks / parts * ROWS_PER_TASK).min(total));
        // SAFETY: each part has its own slot (`parts <= slots.len()`) and its own rows of `y`;
        // both outlive the call.
        let slot = unsafe { &mut *sb.get().add(i) };
        while r < end {
            let (kr, e) = (r / g, ((r / g + 1) * g).min(end));
            prep(kr, slot);
            run(r, unsafe { std::slice::from_raw_parts_mut(yb.get().add(r), e - r) }, slot);
            r = e;
        }
    };
    if for_each(parts, &part) {
        return;
    }
    use rayon::prelude::*;
    y.par_chunks_mut(g).zip(slots.par_iter_mut()).enumerate().for_each(|(kr, (y, p))| {
        prep(kr, p);
        let p = &*p;
        y.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(|(t, y)| run(kr * g + t * ROWS_PER_TASK, y, p));
    });
}

/// The reusable slots of [`grouped_rows`] for `P`, kept per thread between calls: `f` gets at
/// least `n` of them. Taken out of the thread-local while in use, so a call nested on the
/// same thread (a rayon worker stealing another matvec) starts from an empty set instead of
/// failing.
pub fn with_slots<P: Default + 'static, R>(
    key: &'static std::thread::LocalKey<std::cell::Cell<Vec<P>>>,
    n: usize,
    f: impl FnOnce(&mut [P]) -> R,
) -> R {
    let mut slots = key.take();
    if slots.len() < n {
        slots.resize_with(n, P::default);
    }
    let r = f(&mut slots[..n]);
    key.set(slots);
    r
}

struct SendPtr<T>(*mut T);
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
impl<T> SendPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}
// SAFETY: used for disjoint parts only (chunks of `y` in `for_each_chunk`, slots in
// `grouped_rows`), each reached by one task; `T: Send` as those parts move between threads.
unsafe impl<T: Send> Send for SendPtr<T> {}
unsafe impl<T: Send> Sync for SendPtr<T> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_on_a_team_and_without_one() {
        for helpers in [0, 1, 3] {
            with_team(helpers, || {
                for n in [0usize, 1, 7, 1000] {
                    let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                    for _ in 0..50 {
                        let ran = for_each(n, &|i| {
                            hits[i].fetch_add(1, Relaxed);
                        });
                        assert_eq!(ran, helpers > 0);
                        if !ran {
                            (0..n).for_each(|i| {
                                hits[i].fetch_add(1, Relaxed);
                            });
                        }
                    }
                    assert!(hits.iter().all(|h| h.load(Relaxed) == 50), "{helpers} helpers, {n} tasks");
                }
                let mut y = vec![0f32; 1003];
                for_each_chunk(&mut y, 32, &|i, c| {
                    c.iter_mut().enumerate().for_each(|(j, v)| *v = (i * 32 + j) as f32)
                });
                assert!(y.iter().enumerate().all(|(i, &v)| v == i as f32));
            });
        }
        assert!(!for_each(3, &|_| {}), "the team is gone after with_team");
        // A loop inside a task runs without the team (on rayon), and still runs every index.
        with_team(1, || {
            let hits: Vec<AtomicUsize> = (0..8 * 16).map(|_| AtomicUsize::new(0)).collect();
            let mut y = vec![0f32; 8];
            for_each_chunk(&mut y, 1, &|i, _| {
                let mut inner = vec![0f32; 16];
                for_each_chunk(&mut inner, 4, &|j, c| {
                    for (k, _) in c.iter().enumerate() {
                        hits[i * 16 + j * 4 + k].fetch_add(1, Relaxed);
                    }
                });
            });
            assert!(hits.iter().all(|h| h.load(Relaxed) == 1));
        });
    }

    #[test]
    fn a_helper_busy_for_a_few_milliseconds_still_joins() {
        // The pool's other worker is asleep in a job of 5 ms when the team starts: it joins
        // when it wakes, within the enrolment wait (the 2 ms wait this had before would not).
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let (busy, go) = (AtomicBool::new(false), AtomicBool::new(false));
        pool.in_place_scope(|scope| {
            scope.spawn(|_| {
                busy.store(true, SeqCst);
                while !go.load(SeqCst) {
                    std::hint::spin_loop();
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            });
            // The team's leader runs on the other worker, once the first one holds the job.
            pool.install(|| {
                while !busy.load(SeqCst) {
                    std::hint::spin_loop();
                }
                go.store(true, SeqCst);
                let t = std::time::Instant::now();
                let joined = with_team(1, members);
                assert_eq!(joined, 2, "the helper did not join within {:?}", t.elapsed());
            });
        });
    }

    #[test]
    fn serial_runs_every_row_in_order_on_this_thread() {
        let me = std::thread::current().id();
        let order = std::sync::Mutex::new(Vec::new());
        let mut y = vec![0f32; 100];
        serial(|| {
            for_each_chunk(&mut y, 32, &|i, c| {
                assert_eq!(std::thread::current().id(), me);
                order.lock().unwrap().push(i);
                c.fill(i as f32);
            });
            let mut slots = vec![0usize; 4];
            let mut z = vec![0f32; 100];
            grouped_rows(&mut z, 30, &mut slots, &|kr, p| *p = kr + 1, &|r0, y, p| {
                assert_eq!(std::thread::current().id(), me);
                y.iter_mut().enumerate().for_each(|(i, y)| *y = ((r0 + i) * 10 + p) as f32);
            });
            assert!(z.iter().enumerate().all(|(r, &v)| v == (r * 10 + r / 30 + 1) as f32));
        });
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
        assert!(y.iter().enumerate().all(|(r, &v)| v == (r / 32) as f32));
        assert!(!is_serial(), "serial ends with its closure");
    }

    #[test]
    fn grouped_runs_stay_inside_their_group_on_a_team_and_on_rayon() {
        // Groups of 30 and 100 rows against runs of ROWS_PER_TASK = 32: runs cross group
        // borders unless cut there.
        for helpers in [0, 1] {
            with_team(helpers, || {
                for (n, g) in [(100usize, 30usize), (1003, 100), (64, 64), (5, 30)] {
                    let mut slots = vec![usize::MAX; n.div_ceil(g) + 1];
                    let mut y = vec![-1f32; n];
                    grouped_rows(&mut y, g, &mut slots, &|kr, p| *p = kr, &|r0, c, &kr| {
                        assert!(
                            !c.is_empty() && r0 / g == kr && (r0 + c.len() - 1) / g == kr,
                            "run {r0}+{} in group {kr}",
                            c.len()
                        );
                        assert!(c.iter().all(|&v| v == -1.0), "a row written twice");
                        c.iter_mut().enumerate().for_each(|(i, v)| *v = (r0 + i) as f32);
                    });
                    assert!(y.iter().enumerate().all(|(r, &v)| v == r as f32), "{helpers} helpers, {n} rows, g {g}");
                }
            });
        }
    }

    #[test]
    fn a_panicking_task_reaches_the_leader_and_the_team_still_stops() {
        let r = std::panic::catch_unwind(|| {
            with_team(1, || {
                for _ in 0..200 {
                    for_each(64, &|i| assert!(i != 17, "task 17"));
                }
            })
        });
        assert!(r.is_err());
        assert!(!for_each(3, &|_| {}));
    }
}

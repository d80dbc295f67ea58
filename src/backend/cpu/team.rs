//! Threads that spin waiting for work, for the decode step's ops: a product or an attention call
//! there takes a few microseconds, about what handing a task to a sleeping rayon worker costs,
//! so rayon's second thread added little to generation. A partner that is already spinning
//! takes its share within a fraction of a microsecond (OpenMP, which transformers' side runs
//! on, spins the same way).
//!
//! The team has `rayon::current_num_threads() - 1` partners, started on first use. A partner
//! spins for [`SPIN`] after its last job, then parks until the next one. One caller at a time
//! uses the team; any other (a nested or concurrent call) runs every part itself. Each part
//! writes what it writes whichever thread runs it, so results never depend on the team.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::OnceLock;
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long a partner spins after a job before it parks: longer than any gap between a decode
/// step's ops, short enough that work outside the decode loop gets the core back soon.
const SPIN: Duration = Duration::from_micros(200);

/// A job: called with the part index, 1..parts on the partners.
type Job = dyn Fn(usize) + Sync;

/// One job's step of `Team::epoch`; the bits below hold its part count.
const EPOCH: usize = 1 << 16;

struct Team {
    /// Bumped by the caller for each job, by [`EPOCH`] plus the job's parts (the caller's
    /// included) in the low bits: one load gives a partner both, so a partner that sits a job
    /// out (numbered from `parts` on) never mistakes the next job's count for this one's.
    epoch: AtomicUsize,
    /// Partners still running the current job.
    remaining: AtomicUsize,
    /// Whether a partner's part panicked.
    panicked: AtomicBool,
    /// Held by the one caller using the team.
    busy: AtomicBool,
    /// The current job, its lifetime erased: written before `epoch` is bumped, and the caller
    /// waits for `remaining` to reach 0 before the job goes out of scope.
    job: UnsafeCell<Option<*const Job>>,
    partners: Vec<Partner>,
}

struct Partner {
    thread: Thread,
    parked: AtomicBool,
}

// SAFETY: `job` is written only by the caller holding `busy` while no partner reads it (all
// finished the last job), and read by partners only between the bump of `epoch` and their
// decrement of `remaining`; the job itself is `Sync`.
unsafe impl Sync for Team {}

fn team() -> &'static Team {
    static TEAM: OnceLock<&'static Team> = OnceLock::new();
    TEAM.get_or_init(|| {
        let n = rayon::current_num_threads().saturating_sub(1);
        // Each partner sends its handle first: its own `team()` call waits for this one.
        let (tx, rx) = std::sync::mpsc::channel();
        for part in 1..=n {
            let tx = tx.clone();
            std::thread::Builder::new()
                .name(format!("rlhf-team-{part}"))
                .spawn(move || {
                    tx.send((part, std::thread::current())).ok();
                    partner_loop(part);
                })
                .expect("starting a team thread");
        }
        let mut handles: Vec<(usize, Thread)> = (0..n)
            .map(|_| rx.recv().expect("a team thread's handle"))
            .collect();
        handles.sort_by_key(|h| h.0);
        let partners = handles
            .into_iter()
            .map(|(_, thread)| Partner {
                thread,
                parked: AtomicBool::new(false),
            })
            .collect();
        Box::leak(Box::new(Team {
            epoch: AtomicUsize::new(0),
            remaining: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            job: UnsafeCell::new(None),
            partners,
        }))
    })
}

fn partner_loop(part: usize) {
    let team = team();
    let me = &team.partners[part - 1];
    let mut seen = 0;
    loop {
        let mut since = Instant::now();
        let mut spins = 0u32;
        let mut now = team.epoch.load(SeqCst);
        while now == seen {
            std::hint::spin_loop();
            spins += 1;
            if spins.is_multiple_of(1024) && since.elapsed() > SPIN {
                me.parked.store(true, SeqCst);
                // Re-checked after `parked` is set: a job posted before it would not unpark.
                if team.epoch.load(SeqCst) == seen {
                    std::thread::park();
                }
                me.parked.store(false, SeqCst);
                since = Instant::now();
            }
            now = team.epoch.load(SeqCst);
        }
        seen = now;
        if part >= now % EPOCH {
            continue;
        }
        // SAFETY: the job was written before the epoch was bumped and stays alive until every
        // partner has decremented `remaining` (see `Team::job`).
        let job = unsafe { (*team.job.get()).expect("a posted job") };
        if catch_unwind(AssertUnwindSafe(|| unsafe { (*job)(part) })).is_err() {
            team.panicked.store(true, SeqCst);
        }
        team.remaining.fetch_sub(1, SeqCst);
    }
}

/// The team's threads, the caller's included.
pub fn size() -> usize {
    team().partners.len() + 1
}

/// Calls `f(i)` for every `i` in `0..items` on the team, and returns when all are done. Each
/// thread works through its own contiguous block of items front to back; one that runs out
/// takes the back half of what another has left, as rayon does, and works through that front
/// to back. A product's weights so stream in long forward runs (which the prefetches ahead of
/// them assume), and a thread held up elsewhere delays no one.
pub fn for_each(items: usize, f: &(dyn Fn(usize) + Sync)) {
    let parts = size().min(items).min(MAX_PARTS);
    let blocks: [Block; MAX_PARTS] = std::array::from_fn(|p| match p < parts {
        true => Block::new(p * items / parts, (p + 1) * items / parts),
        false => Block::new(0, 0),
    });
    let blocks = &blocks[..parts];
    run(parts, &|p| loop {
        while let Some(i) = blocks[p].front() {
            f(i);
        }
        let stolen = (1..parts).find_map(|d| blocks[(p + d) % parts].back_half());
        match stolen {
            Some((lo, hi)) => blocks[p].0.store(Block::pack(lo, hi), SeqCst),
            None => break,
        }
    });
}

/// The most threads [`for_each`] splits work over.
const MAX_PARTS: usize = 32;

/// The unclaimed items `lo..hi` of one thread's block, packed in one word so that a claim from
/// either end is one compare-and-swap. Each on its own cache line: threads claiming from their
/// own blocks then never contend. Items are never claimed twice, so a range never recurs and a
/// stale compare-and-swap always fails.
#[repr(align(64))]
struct Block(AtomicU64);

impl Block {
    fn new(lo: usize, hi: usize) -> Block {
        Block(AtomicU64::new(Block::pack(lo, hi)))
    }
    fn pack(lo: usize, hi: usize) -> u64 {
        ((hi as u64) << 32) | lo as u64
    }
    /// Claims the first unclaimed item.
    fn front(&self) -> Option<usize> {
        let ((lo, _), _) = self.claim(|lo, hi| (lo < hi).then_some((lo + 1, hi)))?;
        Some(lo)
    }
    /// Claims the back half of the unclaimed items (rounded up), returned as a range.
    fn back_half(&self) -> Option<(usize, usize)> {
        let ((_, hi), (_, mid)) =
            self.claim(|lo, hi| (lo < hi).then_some((lo, hi - (hi - lo).div_ceil(2))))?;
        Some((mid, hi))
    }
    /// Replaces `lo..hi` by `next(lo, hi)` unless that is `None`; returns the old and the new
    /// range.
    fn claim(
        &self,
        next: impl Fn(usize, usize) -> Option<(usize, usize)>,
    ) -> Option<((usize, usize), (usize, usize))> {
        let mut cur = self.0.load(SeqCst);
        loop {
            let (lo, hi) = ((cur & 0xffff_ffff) as usize, (cur >> 32) as usize);
            let (nlo, nhi) = next(lo, hi)?;
            match self
                .0
                .compare_exchange_weak(cur, Block::pack(nlo, nhi), SeqCst, SeqCst)
            {
                Ok(_) => return Some(((lo, hi), (nlo, nhi))),
                Err(now) => cur = now,
            }
        }
    }
}

/// Runs `f(0)` on the calling thread and `f(1)`..`f(parts - 1)` on the partners, and returns
/// when all have finished; `parts` is at most [`size`]. When the team is in use (a nested or a
/// concurrent call), the caller runs all the parts itself, in order.
fn run(parts: usize, f: &(dyn Fn(usize) + Sync)) {
    let team = team();
    assert!(
        parts <= size() && parts < EPOCH,
        "team::run: {parts} parts for a team of {}",
        size()
    );
    if parts <= 1 || team.busy.swap(true, SeqCst) {
        (0..parts).for_each(f);
        return;
    }
    let helpers = &team.partners[..parts - 1];
    // SAFETY: only the caller holding `busy` writes the job, and no partner is reading it:
    // all finished the previous one (`remaining` was 0). The lifetime is erased, but the
    // caller waits below for every partner to be done with `f`, even if its own part panics.
    unsafe {
        *team.job.get() = Some(std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static Job>(f));
    }
    team.remaining.store(helpers.len(), SeqCst);
    let old = team.epoch.load(SeqCst);
    team.epoch.store((old / EPOCH + 1) * EPOCH + parts, SeqCst);
    for p in helpers {
        if p.parked.load(SeqCst) {
            p.thread.unpark();
        }
    }
    let mine = catch_unwind(AssertUnwindSafe(|| f(0)));
    while team.remaining.load(SeqCst) != 0 {
        std::hint::spin_loop();
    }
    let theirs = team.panicked.swap(false, SeqCst);
    team.busy.store(false, SeqCst);
    if let Err(e) = mine {
        std::panic::resume_unwind(e);
    }
    assert!(!theirs, "a team thread's part panicked");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `for_each` over `items` and returns how often each item was visited.
    fn visits(items: usize) -> Vec<usize> {
        let counts: Vec<AtomicUsize> = (0..items).map(|_| AtomicUsize::new(0)).collect();
        for_each(items, &|i| {
            counts[i].fetch_add(1, SeqCst);
        });
        counts.into_iter().map(AtomicUsize::into_inner).collect()
    }

    #[test]
    fn every_item_runs_exactly_once() {
        for items in [0, 1, 2, 3, 7, 64, 1000] {
            assert_eq!(visits(items), vec![1; items], "{items} items");
        }
    }

    /// A call from inside a part, and calls from several threads at once, each run every item
    /// once (the ones that find the team busy run alone).
    #[test]
    fn nested_and_concurrent_calls_run_every_item_once() {
        let inner: Vec<AtomicUsize> = (0..50 * 20).map(|_| AtomicUsize::new(0)).collect();
        for_each(50, &|i| {
            for_each(20, &|j| {
                inner[i * 20 + j].fetch_add(1, SeqCst);
            });
        });
        assert!(inner.iter().all(|c| c.load(SeqCst) == 1));
        std::thread::scope(|s| {
            let runs: Vec<_> = (0..4).map(|_| s.spawn(|| visits(300))).collect();
            for r in runs {
                assert_eq!(r.join().unwrap(), vec![1; 300]);
            }
        });
    }

    /// A part's panic reaches the caller, wherever it ran, and the team keeps working.
    #[test]
    fn a_panicking_part_reaches_the_caller() {
        for bad in [0, 50, 99] {
            let r = catch_unwind(|| {
                for_each(100, &|i| {
                    assert!(i != bad, "item {i} fails");
                })
            });
            assert!(r.is_err(), "item {bad}'s panic was lost");
            assert_eq!(visits(100), vec![1; 100]);
        }
    }
}

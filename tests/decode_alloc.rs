//! The decode loop allocates nothing after its first step. In a file of its own: the counting
//! allocator counts every thread of the binary, so no other test may run beside it.

use rlhf::backend::cpu::Cpu;
use rlhf::model::generate::{generate, SamplingConfig};
use rlhf::model::Model;
use rlhf::rng::Rng;
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts every allocation made by this test binary.
struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);
// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}
#[global_allocator]
static GLOBAL: Counting = Counting;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/models")
        .join(name)
}

fn prompts() -> Vec<Vec<u32>> {
    let mut rng = Rng::new(2);
    [7usize, 3, 12, 1]
        .iter()
        .map(|&n| (0..n).map(|_| 2 + rng.below(500) as u32).collect())
        .collect()
}

fn greedy(n: usize) -> SamplingConfig {
    SamplingConfig {
        max_new_tokens: n,
        temperature: 0.0,
        ..Default::default()
    }
}

/// Allocation count of a whole generation does not grow with the number of decode steps: the
/// loop allocates nothing after its setup.
#[test]
fn decode_loop_does_not_allocate() {
    let be = Cpu;
    for name in ["gpt2", "llama"] {
        let model = Model::load(&be, &fixture(name)).unwrap();
        let ps = prompts();
        let sampled = |n| SamplingConfig {
            max_new_tokens: n,
            temperature: 0.9,
            top_k: 40,
            top_p: 0.95,
            ..Default::default()
        };
        let count = |cfg: &SamplingConfig| {
            let before = ALLOCS.load(Ordering::SeqCst);
            generate(&be, &model, &ps, cfg, None, &mut Rng::new(1)).unwrap();
            ALLOCS.load(Ordering::SeqCst) - before
        };
        // Warm-up: the thread pool and every worker's lazily initialised state.
        count(&sampled(40));
        count(&greedy(40));
        for cfg in [greedy(4), sampled(4)] {
            let long_cfg = SamplingConfig {
                max_new_tokens: 40,
                ..cfg.clone()
            };
            // Setup may differ by an allocation either way from one call to the next (cache
            // sizes, when a worker wakes), so each side takes its fewest over a few calls; an
            // allocation in the loop would show in every long call. 36 more steps must add none.
            let fewest = |cfg: &SamplingConfig| (0..3).map(|_| count(cfg)).min().unwrap();
            let (short, long) = (fewest(&cfg), fewest(&long_cfg));
            assert!(
                long <= short,
                "{name}: 36 more decode steps made {} more allocations",
                long - short
            );
        }
    }
}

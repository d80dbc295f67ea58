//! Fixed-order reductions: how the CPU backend stays deterministic under rayon.
//!
//! A sum over rows is split into chunks of a fixed number of rows (never "one chunk per
//! thread"); each chunk is summed sequentially, possibly on any thread, and the chunk partials
//! are then added one after another in chunk order. The rounding is therefore the same whatever
//! the thread count or scheduling.

/// Rows per chunk in a row reduction: large enough that a partial vector per chunk costs little
/// next to the rows it sums, small enough to give every thread work at `N = B·T` of a few hundred.
pub const ROW_CHUNK: usize = 32;

/// Elements per chunk for flat reductions and elementwise passes: a few pages, so that rayon's
/// per-task overhead stays below a percent of the work.
pub const ELEM_CHUNK: usize = 1 << 14;

/// `dst += Σ partials`, adding the partials in order.
pub fn add_partials(dst: &mut [f32], partials: &[Vec<f32>]) {
    for p in partials {
        debug_assert_eq!(p.len(), dst.len());
        for (d, &x) in dst.iter_mut().zip(p) {
            *d += x;
        }
    }
}

/// Accumulator lanes for a dot product or sum: eight independent partial sums that the compiler
/// keeps in vector registers (a single running sum cannot be vectorised without reordering),
/// combined in a fixed order at the end.
const LANES: usize = 8;

/// `Σ a[i]·b[i]` with [`LANES`] partial sums; deterministic and vectorisable.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    combine(acc) + tail
}

/// `Σ a[i]` with [`LANES`] partial sums.
#[inline]
pub fn sum(a: &[f32]) -> f32 {
    sum_by(a, |x| x)
}

/// `Σ f(a[i])` with [`LANES`] partial sums; `f` is inlined so the loop vectorises when `f` does.
#[inline(always)]
pub fn sum_by(a: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let ra = ca.remainder();
    for x in ca {
        for l in 0..LANES {
            acc[l] += f(x[l]);
        }
    }
    let mut tail = 0.0f32;
    for &x in ra {
        tail += f(x);
    }
    combine(acc) + tail
}

/// `max a[i]` (-inf for an empty slice) with [`LANES`] running maxima; NaNs are skipped (a NaN
/// still reaches the sums that follow a max).
#[inline]
pub fn max(a: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let ca = a.chunks_exact(LANES);
    let ra = ca.remainder();
    for x in ca {
        for l in 0..LANES {
            // A compare-and-select, not f32::max: it maps to one SIMD max instruction.
            acc[l] = if x[l] > acc[l] { x[l] } else { acc[l] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &x in acc.iter().chain(ra) {
        m = if x > m { x } else { m };
    }
    m
}

/// Adds the lanes pairwise, in a fixed order.
#[inline]
fn combine(acc: [f32; LANES]) -> f32 {
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

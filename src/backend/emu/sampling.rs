//! Sampling on the device (`kernels/sampling.cu`): the launch plan of `sample_f32` and the
//! driver of [`DecodeOps::sample_tokens`](crate::backend::DecodeOps::sample_tokens), generic over
//! the [`Launcher`] like the drivers in [`super::ops`]. Only the listed rows' ids, uniforms and
//! results cross to and from the device, never the (B, V) logits.

use super::ops::{KernelError, Launcher};
use super::plan::{self, Arg, DevPtr, Launch};
use crate::backend::SampleParams;

/// Threads per block of `sample_f32` (`SAMPLE_BLOCK` in sampling.cu), one block per row: each
/// thread owns a contiguous chunk of the vocabulary (~600 tokens of 150k) for the draw.
pub const SAMPLE_BLOCK: u32 = 256;

/// Pointers of `sample_f32`.
#[derive(Clone, Copy, Debug)]
pub struct SamplePtrs {
    /// (B, V) f32 logits.
    pub logits: DevPtr,
    /// (N) u32 row indices, `< B`.
    pub rows: DevPtr,
    /// (N) f64 uniforms in [0, 1), or null when greedy.
    pub uniforms: DevPtr,
    /// (N, 2) f64, written: the token (exact in an f64) and its log-prob.
    pub out: DevPtr,
}

/// `sample_f32(logits, rows, uniforms, V, temperature, top_k, top_p, out)`: one block per listed
/// row (`n` of them). A top-k of 0 or of at least V is passed as 0 (off), as the kernel takes it.
pub fn sample(p: SamplePtrs, n: usize, v: usize, params: SampleParams) -> Launch {
    let top_k = if params.top_k < v { params.top_k } else { 0 };
    let args = vec![
        Arg::Ptr(p.logits),
        Arg::Ptr(p.rows),
        Arg::Ptr(p.uniforms),
        plan::int(v, "V"),
        Arg::F32(params.temperature),
        plan::int(top_k, "top_k"),
        Arg::F32(params.top_p),
        Arg::Ptr(p.out),
    ];
    Launch::new(plan::SAMPLE_F32, n, SAMPLE_BLOCK, args)
}

/// [`DecodeOps::sample_tokens`](crate::backend::DecodeOps::sample_tokens) on the kernel: checks
/// every argument against the logits' length (panicking as the CPU op does), uploads the rows and
/// uniforms, launches `sample_f32` and reads back one id and log-prob per listed row.
#[allow(clippy::too_many_arguments)]
pub fn sample_tokens<L: Launcher>(
    l: &L,
    logits: L::View<'_>,
    rows: &[u32],
    v: usize,
    p: SampleParams,
    uniforms: &[f64],
    ids: &mut [u32],
    logps: &mut [f32],
) -> Result<(), KernelError> {
    let n = rows.len();
    p.check_args(
        l.view_len(logits),
        rows,
        v,
        uniforms.len(),
        ids.len(),
        logps.len(),
    );
    if n == 0 {
        return Ok(());
    }
    let rows_dev = l.scratch_u32(rows)?;
    let uniforms_dev = if p.is_greedy() {
        None
    } else {
        Some(l.scratch_u32(&f64_halves(uniforms))?)
    };
    let out = l.scratch(2 * n)?;
    let ptrs = SamplePtrs {
        logits: l.ptr(logits),
        rows: l.scratch_ptr(&rows_dev),
        uniforms: uniforms_dev
            .as_ref()
            .map_or(DevPtr::NULL, |u| l.scratch_ptr(u)),
        out: l.scratch_ptr(&out),
    };
    // SAFETY: `check_args` found the logits whole rows of V and every listed row among them; the
    // scratch holds the N rows, N uniforms (read only when sampling) and 2N results.
    unsafe { l.launch(&sample(ptrs, n, v, p))? };
    let got = l.read_f64(&out, 2 * n)?;
    for (i, pair) in got.chunks_exact(2).enumerate() {
        (ids[i], logps[i]) = (pair[0] as u32, pair[1] as f32);
    }
    Ok(())
}

/// Each f64's bits as (low, high) u32 halves: packed two u32 to a little-endian word by
/// [`Launcher::scratch_u32`], they are that f64 again in device memory.
fn f64_halves(x: &[f64]) -> Vec<u32> {
    x.iter()
        .flat_map(|u| {
            let b = u.to_bits();
            [b as u32, (b >> 32) as u32]
        })
        .collect()
}

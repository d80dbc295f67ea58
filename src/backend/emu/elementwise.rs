//! The element-wise part of the model family driven through the kernels: embedding, GELU, SwiGLU,
//! RoPE, the residual ops, the squared norm, AdamW (kernels/{elementwise,embedding,rope,optim}.cu)
//! and the KV-cache store. [`plans`] holds the launch plans; the functions of this module are the
//! drivers, one per `ModelOps` / `DecodeOps` method with the trait's arguments, generic over the
//! [`Launcher`] so that the emulator and a device run the same host code.
//!
//! Every driver checks each view's length (and the ids against the table) with the CPU op's
//! message before it launches anything, as the drivers of [`super::ops`] do: the kernels trust
//! their sizes. Empty inputs launch nothing. Host integer inputs (ids, positions) and the RoPE
//! frequencies are uploaded with [`Launcher::scratch_u32`].

use super::ops::{finish, KernelError, Launcher};
use super::plan::{DevPtr, Launch};
use crate::backend::{AdamW, AttnShape};

pub mod plans {
    //! Launch plans of the element-wise kernels, in each kernel's parameter order (see
    //! [`crate::backend::emu::plan`] for the machinery).

    use crate::backend::emu::plan::{int, Arg, DevPtr, Kernel, Launch, FLAT_BLOCK};
    use crate::backend::emu::plan::{
        ADAMW_F32, ADD_BF16_F32, ADD_F32, ADD_INPLACE_F32, EMBEDDING_BWD_F32, EMBEDDING_FWD_F32,
        GELU_BWD_F32, GELU_FWD_F32, KV_CACHE_STORE_F32, ROPE_F32, SCALE_F32, SUM_SQUARES_F32,
        SWIGLU_BWD_F32, SWIGLU_FWD_F32, TO_BF16_F32,
    };
    use crate::backend::{AdamW, AttnShape};

    /// Elements per chunk of `sum_squares_f32`: the CPU reference's chunk (`ELEM_CHUNK` in
    /// cpu/reduce.rs), so that both reduce the same chunks, each to one f64 partial.
    pub const SUM_SQUARES_CHUNK: usize = 1 << 14;

    /// Largest HD/2 `rope_f32` takes (`ROPE_MAX_HALF`): its cos/sin table of a row lives in
    /// static shared memory, and the CPU op has the same bound.
    pub const ROPE_MAX_HALF: usize = 256;

    /// Most elements one launch of a flat kernel covers: their indices are `int`s, while a flat
    /// view (all gradients of a model of a few billion parameters) can pass `i32::MAX`, so the
    /// drivers split longer views into pieces. A whole number of [`SUM_SQUARES_CHUNK`]s, so that a
    /// piece splits no chunk.
    pub const MAX_FLAT: usize = 1 << 30;

    const _: () = assert!(MAX_FLAT.is_multiple_of(SUM_SQUARES_CHUNK));

    /// One thread per element of a flat kernel, [`FLAT_BLOCK`] to a block.
    fn flat(kernel: Kernel, n: usize, args: Vec<Arg>) -> Launch {
        Launch::new(kernel, n.div_ceil(FLAT_BLOCK as usize), FLAT_BLOCK, args)
    }

    /// `add_f32(a, b, n, out)`.
    pub fn add(a: DevPtr, b: DevPtr, n: usize, out: DevPtr) -> Launch {
        let args = vec![Arg::Ptr(a), Arg::Ptr(b), int(n, "n"), Arg::Ptr(out)];
        flat(ADD_F32, n, args)
    }

    /// `add_inplace_f32(acc, x, n)`.
    pub fn add_inplace(acc: DevPtr, x: DevPtr, n: usize) -> Launch {
        flat(
            ADD_INPLACE_F32,
            n,
            vec![Arg::Ptr(acc), Arg::Ptr(x), int(n, "n")],
        )
    }

    /// `to_bf16_f32(x, n, y)`: y holds n bf16 values.
    pub fn to_bf16(x: DevPtr, n: usize, y: DevPtr) -> Launch {
        flat(TO_BF16_F32, n, vec![Arg::Ptr(x), int(n, "n"), Arg::Ptr(y)])
    }

    /// `add_bf16_f32(acc, x, accumulate, n)`: x holds n bf16 values.
    pub fn add_bf16(acc: DevPtr, x: DevPtr, accumulate: bool, n: usize) -> Launch {
        let args = vec![
            Arg::Ptr(acc),
            Arg::Ptr(x),
            Arg::I32(accumulate as i32),
            int(n, "n"),
        ];
        flat(ADD_BF16_F32, n, args)
    }

    /// `scale_f32(x, s, n)`.
    pub fn scale(x: DevPtr, s: f32, n: usize) -> Launch {
        flat(SCALE_F32, n, vec![Arg::Ptr(x), Arg::F32(s), int(n, "n")])
    }

    /// `gelu_fwd_f32(inp, n, out)`.
    pub fn gelu_fwd(inp: DevPtr, n: usize, out: DevPtr) -> Launch {
        flat(
            GELU_FWD_F32,
            n,
            vec![Arg::Ptr(inp), int(n, "n"), Arg::Ptr(out)],
        )
    }

    /// `gelu_bwd_f32(dinp, inp, dout, n)`: dinp added to.
    pub fn gelu_bwd(dinp: DevPtr, inp: DevPtr, dout: DevPtr, n: usize) -> Launch {
        let args = vec![Arg::Ptr(dinp), Arg::Ptr(inp), Arg::Ptr(dout), int(n, "n")];
        flat(GELU_BWD_F32, n, args)
    }

    /// `swiglu_fwd_f32(inp, I, N·I, out)`: one thread per output element.
    pub fn swiglu_fwd(inp: DevPtr, rows: usize, i: usize, out: DevPtr) -> Launch {
        let n = rows * i;
        let args = vec![Arg::Ptr(inp), int(i, "I"), int(n, "N*I"), Arg::Ptr(out)];
        flat(SWIGLU_FWD_F32, n, args)
    }

    /// `swiglu_bwd_f32(dinp, inp, dout, I, N·I)`: dinp added to, one thread per dout element.
    pub fn swiglu_bwd(dinp: DevPtr, inp: DevPtr, dout: DevPtr, rows: usize, i: usize) -> Launch {
        let n = rows * i;
        let args = vec![
            Arg::Ptr(dinp),
            Arg::Ptr(inp),
            Arg::Ptr(dout),
            int(i, "I"),
            int(n, "N*I"),
        ];
        flat(SWIGLU_BWD_F32, n, args)
    }

    /// `kv_cache_store_f32(qkv, T, NH, KVH, HD, t0, TMAX, k_cache, v_cache)`: one block per qkv
    /// row (B·T).
    pub fn kv_cache_store(
        qkv: DevPtr,
        s: AttnShape,
        t0: usize,
        t_max: usize,
        k_cache: DevPtr,
        v_cache: DevPtr,
    ) -> Launch {
        let args = vec![
            Arg::Ptr(qkv),
            int(s.t, "T"),
            int(s.n_head, "NH"),
            int(s.n_kv_head, "KVH"),
            int(s.head_dim, "HD"),
            int(t0, "t0"),
            int(t_max, "TMAX"),
            Arg::Ptr(k_cache),
            Arg::Ptr(v_cache),
        ];
        Launch::new(KV_CACHE_STORE_F32, s.b * s.t, FLAT_BLOCK, args)
    }

    /// `embedding_fwd_f32(table, ids, C, accumulate, out)`: one block per row; ids is (N) u32.
    pub fn embedding_fwd(
        table: DevPtr,
        ids: DevPtr,
        n: usize,
        c: usize,
        accumulate: bool,
        out: DevPtr,
    ) -> Launch {
        let args = vec![
            Arg::Ptr(table),
            Arg::Ptr(ids),
            int(c, "C"),
            Arg::I32(accumulate as i32),
            Arg::Ptr(out),
        ];
        Launch::new(EMBEDDING_FWD_F32, n, FLAT_BLOCK, args)
    }

    /// The positions of `embedding_bwd_f32` grouped by id (CSR), all u32.
    #[derive(Clone, Copy, Debug)]
    pub struct IdGroupPtrs {
        /// (G) the distinct ids.
        pub rows: DevPtr,
        /// (G + 1) where each id's positions start in `positions`, then N.
        pub starts: DevPtr,
        /// (N) the positions of each id, in increasing order.
        pub positions: DevPtr,
    }

    /// `embedding_bwd_f32(dout, rows, starts, positions, C, tiles, dtable)`: one block per
    /// (distinct id, [`FLAT_BLOCK`] columns); dtable added to.
    pub fn embedding_bwd(
        dout: DevPtr,
        g: IdGroupPtrs,
        groups: usize,
        c: usize,
        dtable: DevPtr,
    ) -> Launch {
        let tiles = c.div_ceil(FLAT_BLOCK as usize);
        let args = vec![
            Arg::Ptr(dout),
            Arg::Ptr(g.rows),
            Arg::Ptr(g.starts),
            Arg::Ptr(g.positions),
            int(c, "C"),
            int(tiles, "tiles"),
            Arg::Ptr(dtable),
        ];
        Launch::new(EMBEDDING_BWD_F32, groups * tiles, FLAT_BLOCK, args)
    }

    /// `rope_f32(qkv, pos, inv_freq, W, NH + KVH, HD, sign)`: one block per row; pos is (N) u32,
    /// inv_freq (HD/2) f32; `sign` 1 rotates forward, -1 back.
    pub fn rope(
        qkv: DevPtr,
        pos: DevPtr,
        inv_freq: DevPtr,
        n: usize,
        s: AttnShape,
        sign: f32,
    ) -> Launch {
        let args = vec![
            Arg::Ptr(qkv),
            Arg::Ptr(pos),
            Arg::Ptr(inv_freq),
            int(s.qkv_width(), "qkv_width"),
            int(s.n_head + s.n_kv_head, "NH+KVH"),
            int(s.head_dim, "HD"),
            Arg::F32(sign),
        ];
        Launch::new(ROPE_F32, n, FLAT_BLOCK, args)
    }

    /// `sum_squares_f32(x, n, chunk, partials)`: one block per [`SUM_SQUARES_CHUNK`] elements,
    /// each writing one f64 partial.
    pub fn sum_squares(x: DevPtr, n: usize, partials: DevPtr) -> Launch {
        let args = vec![
            Arg::Ptr(x),
            int(n, "n"),
            int(SUM_SQUARES_CHUNK, "chunk"),
            Arg::Ptr(partials),
        ];
        Launch::new(
            SUM_SQUARES_F32,
            n.div_ceil(SUM_SQUARES_CHUNK),
            FLAT_BLOCK,
            args,
        )
    }

    /// Pointers of `adamw_f32`, all (n) f32.
    #[derive(Clone, Copy, Debug)]
    pub struct AdamwPtrs {
        /// Updated in place.
        pub params: DevPtr,
        /// Read.
        pub grads: DevPtr,
        /// First moment, updated in place.
        pub m: DevPtr,
        /// Second moment, updated in place.
        pub v: DevPtr,
    }

    /// `adamw_f32(params, grads, m, v, n, decay, step_size, bc2_sqrt, 1-β1, β2, 1-β2, eps)`: one
    /// thread per element. The scalars are formed as cpu/optim.rs forms them (in f64, as Python
    /// does, then rounded to f32), so both sides run the same f32 arithmetic.
    pub fn adamw(p: AdamwPtrs, n: usize, h: &AdamW) -> Launch {
        let (lr, b1, b2) = (h.lr as f64, h.beta1 as f64, h.beta2 as f64);
        let step = h.step.min(i32::MAX as u64) as i32;
        let args = vec![
            Arg::Ptr(p.params),
            Arg::Ptr(p.grads),
            Arg::Ptr(p.m),
            Arg::Ptr(p.v),
            int(n, "n"),
            Arg::F32((1.0 - lr * h.weight_decay as f64) as f32),
            Arg::F32((lr / (1.0 - b1.powi(step))) as f32),
            Arg::F32((1.0 - b2.powi(step)).sqrt() as f32),
            Arg::F32((1.0 - b1) as f32),
            Arg::F32(h.beta2),
            Arg::F32((1.0 - b2) as f32),
            Arg::F32(h.eps),
        ];
        flat(ADAMW_F32, n, args)
    }
}

/// `p` advanced by `elems` values of `size` bytes.
fn at(p: DevPtr, elems: usize, size: usize) -> DevPtr {
    DevPtr(p.0 + (elems * size) as u64)
}

/// The pieces `(start, len)` a flat pass over `n` elements is launched in, in order.
fn pieces(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n)
        .step_by(plans::MAX_FLAT)
        .map(move |s| (s, (n - s).min(plans::MAX_FLAT)))
}

/// Launches `plan(start, len)` for every piece of a flat pass over `n` elements.
///
/// # Safety
///
/// Each launch `plan` gives must be valid for the elements `start..start + len` of its views.
unsafe fn launch_flat<L: Launcher>(
    l: &L,
    n: usize,
    plan: impl Fn(usize, usize) -> Launch,
) -> Result<(), KernelError> {
    for (start, len) in pieces(n) {
        // SAFETY: forwarded from the caller.
        unsafe { l.launch(&plan(start, len))? };
    }
    Ok(())
}

/// Panics unless `ids` index a table of `rows` rows (the CPU op's message).
fn check_ids(op: &str, ids: &[u32], rows: usize) {
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= rows) {
        panic!("{op}: id {bad} is outside the table of {rows} rows");
    }
}

/// [`crate::backend::ModelOps::embedding_forward`]: `out[n] (+)= table[ids[n]]`.
pub fn embedding_forward<L: Launcher>(
    l: &L,
    mut out: L::ViewMut<'_>,
    table: L::View<'_>,
    ids: &[u32],
    c: usize,
    accumulate: bool,
) -> Result<(), KernelError> {
    let op = "embedding_forward";
    assert_eq!(l.view_mut_len(&out), ids.len() * c, "{op}: out is not N·C");
    if c == 0 || ids.is_empty() {
        return Ok(());
    }
    let table_len = l.view_len(table);
    assert_eq!(table_len % c, 0, "{op}: table is not rows·C");
    check_ids(op, ids, table_len / c);
    let dev_ids = l.scratch_u32(ids)?;
    let launch = plans::embedding_fwd(
        l.ptr(table),
        l.scratch_ptr(&dev_ids),
        ids.len(),
        c,
        accumulate,
        l.ptr_mut(&mut out),
    );
    // SAFETY: out holds N·C values, every id indexes a row of the table, and the N ids are
    // uploaded.
    unsafe { l.launch(&launch) }
}

/// Positions grouped by id (CSR), the order `embedding_bwd_f32` adds them in.
struct IdGroups {
    /// The distinct ids, increasing.
    rows: Vec<u32>,
    /// Where each id's positions start in `positions`, then N.
    starts: Vec<u32>,
    /// Every position, grouped by id, increasing within an id.
    positions: Vec<u32>,
}

/// The CSR grouping of `ids`: each id's rows of dout are then added in increasing position, as
/// the CPU's sequential loop adds them, so the sums are the reference's bits.
fn group_by_id(ids: &[u32]) -> IdGroups {
    let n = u32::try_from(ids.len()).expect("embedding_backward: more than u32::MAX ids");
    let mut positions: Vec<u32> = (0..n).collect();
    // Stable: the positions of one id stay in increasing order.
    positions.sort_by_key(|&p| ids[p as usize]);
    let (mut rows, mut starts) = (Vec::new(), Vec::new());
    for (k, &p) in positions.iter().enumerate() {
        let id = ids[p as usize];
        if rows.last() != Some(&id) {
            rows.push(id);
            starts.push(k as u32);
        }
    }
    starts.push(n);
    IdGroups {
        rows,
        starts,
        positions,
    }
}

/// [`crate::backend::ModelOps::embedding_backward`]: `dtable[ids[n]] += dout[n]`, every row of
/// dtable summed in increasing `n` (no atomics: the same bits as the CPU, on every run).
pub fn embedding_backward<L: Launcher>(
    l: &L,
    mut dtable: L::ViewMut<'_>,
    dout: L::View<'_>,
    ids: &[u32],
    c: usize,
) -> Result<(), KernelError> {
    let op = "embedding_backward";
    assert_eq!(l.view_len(dout), ids.len() * c, "{op}: dout is not N·C");
    if c == 0 {
        return Ok(());
    }
    let table_len = l.view_mut_len(&dtable);
    assert_eq!(table_len % c, 0, "{op}: dtable is not rows·C");
    check_ids(op, ids, table_len / c);
    if ids.is_empty() {
        return Ok(());
    }
    let g = group_by_id(ids);
    let (rows, starts) = (l.scratch_u32(&g.rows)?, l.scratch_u32(&g.starts)?);
    let positions = l.scratch_u32(&g.positions)?;
    let ptrs = plans::IdGroupPtrs {
        rows: l.scratch_ptr(&rows),
        starts: l.scratch_ptr(&starts),
        positions: l.scratch_ptr(&positions),
    };
    let launch = plans::embedding_bwd(l.ptr(dout), ptrs, g.rows.len(), c, l.ptr_mut(&mut dtable));
    // SAFETY: dout holds N·C values, every id indexes a row of dtable, and the grouping (G ids,
    // G + 1 starts ending at N, N positions < N) is uploaded.
    unsafe { l.launch(&launch) }
}

/// [`crate::backend::ModelOps::gelu_forward`].
pub fn gelu_forward<L: Launcher>(
    l: &L,
    mut out: L::ViewMut<'_>,
    inp: L::View<'_>,
) -> Result<(), KernelError> {
    let n = l.view_len(inp);
    assert_eq!(
        l.view_mut_len(&out),
        n,
        "gelu_forward: out and inp differ in length"
    );
    let (o, x) = (l.ptr_mut(&mut out), l.ptr(inp));
    // SAFETY: both views hold n values; each piece stays within them.
    unsafe {
        launch_flat(l, n, |s, len| {
            plans::gelu_fwd(at(x, s, 4), len, at(o, s, 4))
        })
    }
}

/// [`crate::backend::ModelOps::gelu_backward`]: dinp added to.
pub fn gelu_backward<L: Launcher>(
    l: &L,
    mut dinp: L::ViewMut<'_>,
    inp: L::View<'_>,
    dout: L::View<'_>,
) -> Result<(), KernelError> {
    let n = l.view_len(inp);
    assert!(
        l.view_mut_len(&dinp) == n && l.view_len(dout) == n,
        "gelu_backward: dinp, inp and dout differ in length"
    );
    let (dx, x, dy) = (l.ptr_mut(&mut dinp), l.ptr(inp), l.ptr(dout));
    // SAFETY: all three views hold n values; each piece stays within them.
    unsafe {
        launch_flat(l, n, |s, len| {
            plans::gelu_bwd(at(dx, s, 4), at(x, s, 4), at(dy, s, 4), len)
        })
    }
}

/// [`crate::backend::ModelOps::swiglu_forward`]. out: (N, I), inp: (N, 2I).
pub fn swiglu_forward<L: Launcher>(
    l: &L,
    mut out: L::ViewMut<'_>,
    inp: L::View<'_>,
    n: usize,
    i: usize,
) -> Result<(), KernelError> {
    assert_eq!(
        l.view_mut_len(&out),
        n * i,
        "swiglu_forward: out is not N·I"
    );
    assert_eq!(
        l.view_len(inp),
        n * 2 * i,
        "swiglu_forward: inp is not N·2I"
    );
    if n == 0 || i == 0 {
        return Ok(());
    }
    let launch = plans::swiglu_fwd(l.ptr(inp), n, i, l.ptr_mut(&mut out));
    // SAFETY: both lengths were checked against N and I above.
    unsafe { l.launch(&launch) }
}

/// [`crate::backend::ModelOps::swiglu_backward`]: dinp added to. dinp, inp: (N, 2I),
/// dout: (N, I).
pub fn swiglu_backward<L: Launcher>(
    l: &L,
    mut dinp: L::ViewMut<'_>,
    inp: L::View<'_>,
    dout: L::View<'_>,
    n: usize,
    i: usize,
) -> Result<(), KernelError> {
    let op = "swiglu_backward";
    assert_eq!(l.view_mut_len(&dinp), n * 2 * i, "{op}: dinp is not N·2I");
    assert_eq!(l.view_len(inp), n * 2 * i, "{op}: inp is not N·2I");
    assert_eq!(l.view_len(dout), n * i, "{op}: dout is not N·I");
    if n == 0 || i == 0 {
        return Ok(());
    }
    let launch = plans::swiglu_bwd(l.ptr_mut(&mut dinp), l.ptr(inp), l.ptr(dout), n, i);
    // SAFETY: all three lengths were checked against N and I above.
    unsafe { l.launch(&launch) }
}

/// `inv_freq[j] = 1 / theta^(2j/HD)` for `j < HD/2`, as f32 bits: rounded exactly as
/// cpu/rope.rs (and transformers) rounds it, so both sides rotate by the same f32 angles.
fn inv_freq_bits(head_dim: usize, theta: f32) -> Vec<u32> {
    (0..head_dim / 2)
        .map(|j| {
            let e = (2 * j) as f32 / head_dim as f32;
            (1.0 / (theta as f64).powf(e as f64) as f32).to_bits()
        })
        .collect()
}

/// RoPE in place on the q and k heads of every row: forward when `sign = 1`, the transpose when
/// `sign = -1` (the CPU's `rope_rotate`, with its messages).
fn rope<L: Launcher>(
    l: &L,
    mut qkv: L::ViewMut<'_>,
    pos: &[u32],
    s: AttnShape,
    theta: f32,
    sign: f32,
) -> Result<(), KernelError> {
    let hd = s.head_dim;
    assert_eq!(
        l.view_mut_len(&qkv),
        pos.len() * s.qkv_width(),
        "rope: qkv is not N·qkv_width with N = pos.len()"
    );
    assert!(hd.is_multiple_of(2), "rope: head_dim {hd} must be even");
    assert!(
        hd / 2 <= plans::ROPE_MAX_HALF,
        "rope: head_dim {hd} above {}",
        2 * plans::ROPE_MAX_HALF
    );
    if pos.is_empty() || hd == 0 {
        return Ok(());
    }
    let dev_pos = l.scratch_u32(pos)?;
    let freq = l.scratch_u32(&inv_freq_bits(hd, theta))?;
    let launch = plans::rope(
        l.ptr_mut(&mut qkv),
        l.scratch_ptr(&dev_pos),
        l.scratch_ptr(&freq),
        pos.len(),
        s,
        sign,
    );
    // SAFETY: qkv holds N rows of qkv_width, the N positions and HD/2 frequencies are uploaded,
    // and HD/2 fits the kernel's table.
    unsafe { l.launch(&launch) }
}

/// [`crate::backend::ModelOps::rope_forward`]. qkv: (N, qkv_width), pos: N position ids.
pub fn rope_forward<L: Launcher>(
    l: &L,
    qkv: L::ViewMut<'_>,
    pos: &[u32],
    shape: AttnShape,
    theta: f32,
) -> Result<(), KernelError> {
    rope(l, qkv, pos, shape, theta, 1.0)
}

/// [`crate::backend::ModelOps::rope_backward`]: the inverse rotation, in place on a gradient.
pub fn rope_backward<L: Launcher>(
    l: &L,
    dqkv: L::ViewMut<'_>,
    pos: &[u32],
    shape: AttnShape,
    theta: f32,
) -> Result<(), KernelError> {
    rope(l, dqkv, pos, shape, theta, -1.0)
}

/// [`crate::backend::ModelOps::add`]: `out = a + b`.
pub fn add<L: Launcher>(
    l: &L,
    mut out: L::ViewMut<'_>,
    a: L::View<'_>,
    b: L::View<'_>,
) -> Result<(), KernelError> {
    let n = l.view_len(a);
    assert!(
        l.view_mut_len(&out) == n && l.view_len(b) == n,
        "add: out, a and b differ in length"
    );
    let (o, a, b) = (l.ptr_mut(&mut out), l.ptr(a), l.ptr(b));
    // SAFETY: all three views hold n values; each piece stays within them.
    unsafe {
        launch_flat(l, n, |s, len| {
            plans::add(at(a, s, 4), at(b, s, 4), len, at(o, s, 4))
        })
    }
}

/// [`crate::backend::ModelOps::add_inplace`]: `acc += x`.
pub fn add_inplace<L: Launcher>(
    l: &L,
    mut acc: L::ViewMut<'_>,
    x: L::View<'_>,
) -> Result<(), KernelError> {
    let n = l.view_len(x);
    assert_eq!(
        l.view_mut_len(&acc),
        n,
        "add_inplace: acc and x differ in length"
    );
    let (acc, x) = (l.ptr_mut(&mut acc), l.ptr(x));
    // SAFETY: both views hold n values; each piece stays within them.
    unsafe {
        launch_flat(l, n, |s, len| {
            plans::add_inplace(at(acc, s, 4), at(x, s, 4), len)
        })
    }
}

/// [`crate::backend::ModelOps::scale`]: `x *= s`.
pub fn scale<L: Launcher>(l: &L, mut x: L::ViewMut<'_>, s: f32) -> Result<(), KernelError> {
    let n = l.view_mut_len(&x);
    let x = l.ptr_mut(&mut x);
    // SAFETY: the view holds n values; each piece stays within it.
    unsafe { launch_flat(l, n, |start, len| plans::scale(at(x, start, 4), s, len)) }
}

/// [`crate::backend::ModelOps::sum_squares`]: `Σ x²` in f64, one partial per fixed chunk, the
/// partials added in a fixed order on the device (no atomics: the same bits on every run).
pub fn sum_squares<L: Launcher>(l: &L, x: L::View<'_>) -> Result<f64, KernelError> {
    let n = l.view_len(x);
    if n == 0 {
        return Ok(0.0);
    }
    let chunks = n.div_ceil(plans::SUM_SQUARES_CHUNK);
    let partials = l.scratch(chunks)?;
    let (x, p) = (l.ptr(x), l.scratch_ptr(&partials));
    // SAFETY: the view holds n values and the scratch one f64 per chunk; a piece starts on a
    // chunk boundary (MAX_FLAT is a whole number of chunks), so its partials start at its first
    // chunk.
    unsafe {
        launch_flat(l, n, |s, len| {
            plans::sum_squares(at(x, s, 4), len, at(p, s / plans::SUM_SQUARES_CHUNK, 8))
        })?
    };
    Ok(finish(l, &partials, chunks, 1)?[0])
}

/// [`crate::backend::ModelOps::adamw`]: one AdamW step; params, m and v updated in place.
pub fn adamw<L: Launcher>(
    l: &L,
    mut params: L::ViewMut<'_>,
    grads: L::View<'_>,
    mut m: L::ViewMut<'_>,
    mut v: L::ViewMut<'_>,
    h: AdamW,
) -> Result<(), KernelError> {
    let n = l.view_len(grads);
    assert!(
        l.view_mut_len(&params) == n && l.view_mut_len(&m) == n && l.view_mut_len(&v) == n,
        "adamw: params, grads, m and v differ in length"
    );
    assert!(h.step >= 1, "adamw: step is 1-based");
    let p = plans::AdamwPtrs {
        params: l.ptr_mut(&mut params),
        grads: l.ptr(grads),
        m: l.ptr_mut(&mut m),
        v: l.ptr_mut(&mut v),
    };
    let piece = |s| plans::AdamwPtrs {
        params: at(p.params, s, 4),
        grads: at(p.grads, s, 4),
        m: at(p.m, s, 4),
        v: at(p.v, s, 4),
    };
    // SAFETY: all four views hold n values; each piece stays within them.
    unsafe { launch_flat(l, n, |s, len| plans::adamw(piece(s), len, &h)) }
}

/// [`crate::backend::DecodeOps::kv_cache_store`]: the k and v parts of `qkv` (B·S rows) into
/// cache columns `t0 .. t0 + S`. Caches: (B, KVH, TMAX, HD).
pub fn kv_cache_store<L: Launcher>(
    l: &L,
    mut k_cache: L::ViewMut<'_>,
    mut v_cache: L::ViewMut<'_>,
    qkv: L::View<'_>,
    shape: AttnShape,
    t0: usize,
    t_max: usize,
) -> Result<(), KernelError> {
    let s = shape;
    assert!(
        t0 + s.t <= t_max,
        "kv_cache_store: columns {t0}..{} beyond the cache's {t_max}",
        t0 + s.t
    );
    let cache = s.b * s.n_kv_head * t_max * s.head_dim;
    assert!(
        l.view_mut_len(&k_cache) == cache && l.view_mut_len(&v_cache) == cache,
        "kv_cache_store: cache is not B·KVH·TMAX·HD"
    );
    assert_eq!(
        l.view_len(qkv),
        s.b * s.t * s.qkv_width(),
        "kv_cache_store: qkv is not B·S·QKV"
    );
    if s.b * s.t * s.n_kv_head * s.head_dim == 0 {
        return Ok(());
    }
    let launch = plans::kv_cache_store(
        l.ptr(qkv),
        s,
        t0,
        t_max,
        l.ptr_mut(&mut k_cache),
        l.ptr_mut(&mut v_cache),
    );
    // SAFETY: qkv holds B·S rows, both caches B·KVH·TMAX·HD values, and t0 + S <= TMAX.
    unsafe { l.launch(&launch) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flat passes beyond `int` indices are split into whole pieces that cover every element once.
    #[test]
    fn pieces_cover_long_views_in_order() {
        let max = plans::MAX_FLAT;
        let got: Vec<_> = pieces(2 * max + 5).collect();
        assert_eq!(got, vec![(0, max), (max, max), (2 * max, 5)]);
        assert_eq!(pieces(max).collect::<Vec<_>>(), vec![(0, max)]);
        assert_eq!(pieces(0).count(), 0);
    }

    /// Each id's positions in increasing order, ids increasing, starts ending at N.
    #[test]
    fn ids_group_into_csr() {
        let g = group_by_id(&[5, 2, 5, 0, 2, 5]);
        assert_eq!(g.rows, vec![0, 2, 5]);
        assert_eq!(g.starts, vec![0, 1, 3, 6]);
        assert_eq!(g.positions, vec![3, 1, 4, 0, 2, 5]);
    }
}

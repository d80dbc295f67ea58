//! Generation with a KV cache on the CPU: storing new keys/values, one-row attention, and picking
//! tokens (in `sample.rs`). Nothing here allocates: the decode loop must not.

use super::math::simd_dispatch;
use super::reduce::dot;
use super::Cpu;
use crate::backend::{AttnShape, DecodeOps, SampleParams};
use rayon::prelude::*;

/// Largest head dim the decode accumulator holds on the stack.
const MAX_HEAD_DIM: usize = 512;

impl DecodeOps for Cpu {
    fn kv_cache_store(
        &self,
        k_cache: &mut [f32],
        v_cache: &mut [f32],
        qkv: &[f32],
        s: AttnShape,
        t0: usize,
        t_max: usize,
    ) {
        kv_cache_store(k_cache, v_cache, qkv, s, t0, t_max)
    }
    fn attention_decode(
        &self,
        out: &mut [f32],
        qkv: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        key_mask: &[bool],
        s: AttnShape,
        len: usize,
        t_max: usize,
    ) {
        attention_decode(out, qkv, k_cache, v_cache, key_mask, s, len, t_max)
    }
    fn sample_tokens(
        &self,
        logits: &[f32],
        rows: &[u32],
        v: usize,
        p: SampleParams,
        uniforms: &[f64],
        ids: &mut [u32],
        logps: &mut [f32],
    ) {
        super::sample::sample_tokens(logits, rows, v, p, uniforms, ids, logps)
    }
}

/// Copies k and v of `qkv` (B·S rows) into caches (B, KVH, TMAX, HD) at columns t0..t0+S.
pub fn kv_cache_store(
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    qkv: &[f32],
    s: AttnShape,
    t0: usize,
    t_max: usize,
) {
    let (hd, kvh, w) = (s.head_dim, s.n_kv_head, s.qkv_width());
    assert!(
        t0 + s.t <= t_max,
        "kv_cache_store: columns {t0}..{} beyond the cache's {t_max}",
        t0 + s.t
    );
    assert_eq!(
        k_cache.len(),
        s.b * kvh * t_max * hd,
        "kv_cache_store: cache is not B·KVH·TMAX·HD"
    );
    assert_eq!(
        qkv.len(),
        s.b * s.t * w,
        "kv_cache_store: qkv is not B·S·QKV"
    );
    let k_off = s.n_head * hd;
    let v_off = k_off + kvh * hd;
    for b in 0..s.b {
        for i in 0..s.t {
            let row = &qkv[(b * s.t + i) * w..(b * s.t + i + 1) * w];
            for h in 0..kvh {
                let dst = ((b * kvh + h) * t_max + t0 + i) * hd;
                k_cache[dst..dst + hd].copy_from_slice(&row[k_off + h * hd..k_off + (h + 1) * hd]);
                v_cache[dst..dst + hd].copy_from_slice(&row[v_off + h * hd..v_off + (h + 1) * hd]);
            }
        }
    }
}

/// One query per sequence against the cache, online softmax over the visible columns.
/// out: (B, NH·HD), qkv: (B, QKV), caches: (B, KVH, TMAX, HD), key_mask: B·TMAX.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode(
    out: &mut [f32],
    qkv: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    key_mask: &[bool],
    s: AttnShape,
    len: usize,
    t_max: usize,
) {
    let (hd, nh, kvh, w) = (s.head_dim, s.n_head, s.n_kv_head, s.qkv_width());
    assert!(
        hd <= MAX_HEAD_DIM,
        "attention_decode: head dim {hd} above {MAX_HEAD_DIM}"
    );
    assert!(
        len <= t_max && key_mask.len() == s.b * t_max,
        "attention_decode: bad cache length or mask"
    );
    assert_eq!(
        out.len(),
        s.b * nh * hd,
        "attention_decode: out is not B·NH·HD"
    );
    let scale = 1.0 / (hd as f32).sqrt();
    let group = nh / kvh;
    // One task per (sequence, query head): each writes its own HD outputs.
    out.par_chunks_mut(hd).enumerate().for_each(|(bh, o)| {
        let (b, h) = (bh / nh, bh % nh);
        let q = &qkv[b * w + h * hd..b * w + (h + 1) * hd];
        let cache = (b * kvh + h / group) * t_max * hd;
        let (k, v) = (
            &k_cache[cache..cache + len * hd],
            &v_cache[cache..cache + len * hd],
        );
        attend_one(o, q, k, v, &key_mask[b * t_max..b * t_max + len], scale);
    });
}

simd_dispatch! {
    /// One query `q` against the visible rows of `k` and `v` (len·HD each): the dot products
    /// and the accumulator update are the per-column work, and vectorise across the head dim.
    fn attend_one(o: &mut [f32], q: &[f32], k: &[f32], v: &[f32], mask: &[bool], scale: f32) =
        attend_one_body;
}

#[inline(always)]
fn attend_one_body(o: &mut [f32], q: &[f32], k: &[f32], v: &[f32], mask: &[bool], scale: f32) {
    let hd = q.len();
    let mut acc = [0.0f32; MAX_HEAD_DIM];
    let acc = &mut acc[..hd];
    let (mut m, mut l) = (f32::NEG_INFINITY, 0.0f32);
    // `exp(0)` is exactly 1, so a zero argument skips the call without changing a bit; one of
    // the two arguments is zero at every column (the max either stays or becomes this score),
    // which halves the libm calls.
    let exp = |d: f32| if d == 0.0 { 1.0 } else { d.exp() };
    for (j, _) in mask.iter().enumerate().filter(|(_, &vis)| vis) {
        let kj = &k[j * hd..(j + 1) * hd];
        let sc = dot(q, kj) * scale;
        let m_new = m.max(sc);
        let (corr, p) = (exp(m - m_new), exp(sc - m_new));
        l = l * corr + p;
        let vj = &v[j * hd..(j + 1) * hd];
        for (a, &x) in acc.iter_mut().zip(vj) {
            *a = *a * corr + p * x;
        }
        m = m_new;
    }
    let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
    for (o, a) in o.iter_mut().zip(acc.iter()) {
        *o = a * inv;
    }
}

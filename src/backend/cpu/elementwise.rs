//! Embedding lookup and the elementwise ops (residual add, accumulation, scaling).

use super::reduce::{ELEM_CHUNK, ROW_CHUNK};
use rayon::prelude::*;

/// `out[n] = table[ids[n]]`, or `out[n] += table[ids[n]]` when `accumulate` (a position table
/// added onto the token embedding).
/// out: (N, C), table: (rows, C), ids: (N) values `< rows`.
pub fn embedding_forward(out: &mut [f32], table: &[f32], ids: &[u32], c: usize, accumulate: bool) {
    assert_eq!(
        out.len(),
        ids.len() * c,
        "embedding_forward: out is not N·C"
    );
    if c == 0 {
        return;
    }
    out.par_chunks_mut(c * ROW_CHUNK)
        .zip(ids.par_chunks(ROW_CHUNK))
        .for_each(|(out, ids)| {
            for (o, &id) in out.chunks_exact_mut(c).zip(ids) {
                let row = &table[id as usize * c..(id as usize + 1) * c];
                if accumulate {
                    for (x, &y) in o.iter_mut().zip(row) {
                        *x += y;
                    }
                } else {
                    o.copy_from_slice(row);
                }
            }
        });
}

/// Table rows per parallel task in `embedding_backward`.
const TABLE_ROWS_PER_TASK: usize = 2048;

/// `dtable[ids[n]] += dout[n]` for every `n`.
/// dtable: (rows, C), dout: (N, C), ids: (N).
///
/// Parallel over blocks of table rows: each task scans all ids and adds, in increasing `n`, the
/// rows that land in its block. Every table row thus receives its contributions in the same
/// order as a sequential loop, whatever the threads, and no two tasks write the same row.
pub fn embedding_backward(dtable: &mut [f32], dout: &[f32], ids: &[u32], c: usize) {
    assert_eq!(
        dout.len(),
        ids.len() * c,
        "embedding_backward: dout is not N·C"
    );
    if c == 0 {
        return;
    }
    assert_eq!(
        dtable.len() % c,
        0,
        "embedding_backward: dtable is not rows·C"
    );
    let rows = dtable.len() / c;
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= rows) {
        panic!("embedding_backward: id {bad} is outside the table of {rows} rows");
    }
    dtable
        .par_chunks_mut(c * TABLE_ROWS_PER_TASK)
        .enumerate()
        .for_each(|(blk, dt)| {
            let first = blk * TABLE_ROWS_PER_TASK;
            let last = first + dt.len() / c;
            for (n, &id) in ids.iter().enumerate() {
                let id = id as usize;
                if (first..last).contains(&id) {
                    let dst = &mut dt[(id - first) * c..(id - first + 1) * c];
                    for (x, &y) in dst.iter_mut().zip(&dout[n * c..(n + 1) * c]) {
                        *x += y;
                    }
                }
            }
        });
}

/// `out = a + b`. out, a, b: equal lengths.
pub fn add(out: &mut [f32], a: &[f32], b: &[f32]) {
    assert!(
        out.len() == a.len() && a.len() == b.len(),
        "add: out, a and b differ in length"
    );
    out.par_chunks_mut(ELEM_CHUNK)
        .zip(a.par_chunks(ELEM_CHUNK).zip(b.par_chunks(ELEM_CHUNK)))
        .for_each(|(o, (a, b))| {
            for ((o, &x), &y) in o.iter_mut().zip(a).zip(b) {
                *o = x + y;
            }
        });
}

/// `acc += x`. acc, x: equal lengths.
pub fn add_inplace(acc: &mut [f32], x: &[f32]) {
    assert_eq!(
        acc.len(),
        x.len(),
        "add_inplace: acc and x differ in length"
    );
    acc.par_chunks_mut(ELEM_CHUNK)
        .zip(x.par_chunks(ELEM_CHUNK))
        .for_each(|(a, x)| {
            for (a, &y) in a.iter_mut().zip(x) {
                *a += y;
            }
        });
}

/// `x *= s`.
pub fn scale(x: &mut [f32], s: f32) {
    x.par_chunks_mut(ELEM_CHUNK).for_each(|x| {
        for v in x {
            *v *= s;
        }
    });
}

//! Benchmarks of the CPU backend's model ops at GPT-2-small-ish training shapes (d = 384,
//! batch 8 × 128 tokens), plus the raw sgemm rate of this machine through `gemm`, the ceiling
//! for every matmul above.
//!
//! Run: `cargo bench --bench ops -- --warm-up-time 1 --measurement-time 3`
//! (add a name to run one: `cargo bench --bench ops -- attention`).

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use rlhf::backend::cpu::Cpu;
use rlhf::backend::{AttnShape, ModelOps};
use std::time::Instant;

const CPU: Cpu = Cpu;

/// Deterministic pseudo-random data in [-1, 1) (the values do not matter for timing, only
/// that they are not all equal).
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// `out = inp · wᵀ + b` and its backward at an MLP up-projection: N = 1024 tokens, C = 384,
/// OC = 1536. Throughput is in floating-point operations (2·N·C·OC per product).
fn matmul(c: &mut Criterion) {
    let (n, ci, oc) = (1024, 384, 1536);
    let inp = data(n * ci, 1);
    let w = data(oc * ci, 2);
    let b = data(oc, 3);
    let dout = data(n * oc, 4);
    let mut out = vec![0.0; n * oc];
    let (mut dinp, mut dw, mut db) = (vec![0.0; n * ci], vec![0.0; oc * ci], vec![0.0; oc]);
    let flops = 2 * n * ci * oc;
    let mut g = c.benchmark_group("matmul 1024x384x1536");
    g.throughput(Throughput::Elements(flops as u64));
    g.bench_function("forward", |bch| {
        bch.iter(|| CPU.matmul_forward(&mut out, &inp, &w, Some(&b), n, ci, oc))
    });
    g.throughput(Throughput::Elements(2 * flops as u64));
    g.bench_function("backward", |bch| {
        bch.iter(|| {
            CPU.matmul_backward(Some(&mut dinp), &mut dw, &dout, &inp, &w, n, ci, oc);
            CPU.bias_backward(&mut db, &dout, n, oc);
        })
    });
    g.finish();
}

/// The decode step's product, 8 rows (one token of 8 sequences), at the llama fixture's LM head
/// (C = 64, OC = 512; weights in L1/L2) and the 6-layer config's MLP up-projection (C = 384,
/// OC = 1536; 2.4 MB of weights, from L2/L3 here, where a real step reads them from memory).
fn matmul_decode(c: &mut Criterion) {
    let n = 8;
    for (ci, oc) in [(64, 512), (384, 1536)] {
        let (inp, w, b) = (data(n * ci, 1), data(oc * ci, 2), data(oc, 3));
        let mut out = vec![0.0; n * oc];
        let mut g = c.benchmark_group(format!("matmul decode {n}x{ci}x{oc}"));
        g.throughput(Throughput::Elements((2 * n * ci * oc) as u64));
        // On a pool thread, as `rlhf` runs every command: from outside, each call of a
        // microseconds-long op would wait for a worker to wake.
        g.bench_function("forward", |bch| {
            rayon::scope(|_| {
                bch.iter(|| CPU.matmul_forward(&mut out, &inp, &w, Some(&b), n, ci, oc))
            })
        });
        g.finish();
    }
}

/// A prefill's products (128 prompt tokens, the 6-layer config's up- and down-projections):
/// the dot-product kernel `matmul_forward` picks at this size, against the gemm call it
/// replaces (bias copied in, gemm accumulating onto it, rayon threads), in one run.
fn matmul_prefill(c: &mut Criterion) {
    let n = 128;
    for (ci, oc) in [(384, 1536), (1536, 384)] {
        let (inp, w, b) = (data(n * ci, 1), data(oc * ci, 2), data(oc, 3));
        let mut out = vec![0.0; n * oc];
        let mut g = c.benchmark_group(format!("matmul prefill {n}x{ci}x{oc}"));
        g.throughput(Throughput::Elements((2 * n * ci * oc) as u64));
        g.bench_function("dots", |bch| {
            rayon::scope(|_| {
                bch.iter(|| CPU.matmul_forward(&mut out, &inp, &w, Some(&b), n, ci, oc))
            })
        });
        g.bench_function("gemm", |bch| {
            rayon::scope(|_| {
                bch.iter(|| {
                    for row in out.chunks_exact_mut(oc) {
                        row.copy_from_slice(&b);
                    }
                    // SAFETY: out (N, OC), inp (N, C) and w (OC, C) read as its transpose are
                    // in bounds and distinct.
                    unsafe {
                        gemm::gemm(
                            n,
                            oc,
                            ci,
                            out.as_mut_ptr(),
                            1,
                            oc as isize,
                            true,
                            inp.as_ptr(),
                            1,
                            ci as isize,
                            w.as_ptr(),
                            ci as isize,
                            1,
                            1.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::Rayon(0),
                        )
                    }
                })
            })
        });
        g.finish();
    }
}

/// Causal attention, no padding, at B = 8, T = 128 with the 6-layer config's heads (NH = KVH = 6,
/// HD = 64) and the llama fixture's (NH = 4, KVH = 2, HD = 16).
fn attention(c: &mut Criterion) {
    for (n_head, n_kv_head, head_dim) in [(6, 6, 64), (4, 2, 16)] {
        let s = AttnShape {
            b: 8,
            t: 128,
            n_head,
            n_kv_head,
            head_dim,
        };
        let n = s.b * s.t;
        let qkv = data(n * s.qkv_width(), 5);
        let mask = vec![true; n];
        let dout = data(n * s.out_width(), 6);
        let mut out = vec![0.0; n * s.out_width()];
        let mut lse = vec![0.0; s.b * s.n_head * s.t];
        let mut dqkv = vec![0.0; qkv.len()];
        CPU.attention_forward(&mut out, &mut lse, &qkv, &mask, s);
        // Useful flops of the causal products: QKᵀ and PV forward, four products backward, each
        // 2·HD multiply-adds per visible (query, key) pair.
        let pairs = s.b * s.n_head * s.t * (s.t + 1) / 2;
        let mut g = c.benchmark_group(format!(
            "attention B8 T128 NH{n_head} KVH{n_kv_head} HD{head_dim}"
        ));
        g.throughput(Throughput::Elements((2 * 2 * s.head_dim * pairs) as u64));
        g.bench_function("forward", |bch| {
            let mut o = out.clone();
            let mut l = lse.clone();
            bch.iter(|| CPU.attention_forward(&mut o, &mut l, &qkv, &mask, s))
        });
        g.throughput(Throughput::Elements((5 * 2 * s.head_dim * pairs) as u64));
        g.bench_function("backward", |bch| {
            bch.iter(|| CPU.attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, &mask, s))
        });
        g.finish();
    }
}

/// LayerNorm forward and backward at N = 1024, C = 384.
fn layernorm(c: &mut Criterion) {
    let (n, ci) = (1024, 384);
    let inp = data(n * ci, 7);
    let w = data(ci, 8);
    let b = data(ci, 9);
    let dout = data(n * ci, 10);
    let (mut out, mut mean, mut rstd) = (vec![0.0; n * ci], vec![0.0; n], vec![0.0; n]);
    let (mut dinp, mut dw) = (vec![0.0; n * ci], vec![0.0; ci]);
    let mut g = c.benchmark_group("layernorm 1024x384");
    g.throughput(Throughput::Elements((n * ci) as u64));
    g.bench_function("forward", |bch| {
        bch.iter(|| {
            CPU.layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &w, &b, n, ci, 1e-5)
        })
    });
    g.bench_function("backward", |bch| {
        bch.iter(|| {
            CPU.layernorm_backward(&mut dinp, &mut dw, &dout, &inp, &w, &mean, &rstd, n, ci)
        })
    });
    g.finish();
}

/// GELU forward and backward on the MLP activation, N = 1024 × 1536.
fn gelu(c: &mut Criterion) {
    let len = 1024 * 1536;
    let inp = data(len, 11);
    let dout = data(len, 12);
    let mut out = vec![0.0; len];
    let mut dinp = vec![0.0; len];
    let mut g = c.benchmark_group("gelu 1024x1536");
    g.throughput(Throughput::Elements(len as u64));
    g.bench_function("forward", |bch| {
        bch.iter(|| CPU.gelu_forward(&mut out, &inp))
    });
    g.bench_function("backward", |bch| {
        bch.iter(|| CPU.gelu_backward(&mut dinp, &inp, &dout))
    });
    g.finish();
}

/// Fused log-softmax + gather (with entropy) at N = 1024 rows of V = 512, and at GPT-2's
/// vocabulary (N = 128, V = 50257). Throughput is in logits.
fn logprobs(c: &mut Criterion) {
    for (n, v) in [(1024, 512), (128, 50257)] {
        let logits: Vec<f32> = data(n * v, 13).iter().map(|x| 4.0 * x).collect();
        let targets: Vec<u32> = (0..n).map(|i| ((i * 7919) % v) as u32).collect();
        let (mut logp, mut ent, mut lse) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        let dlogp = data(n, 14);
        let dent = data(n, 15);
        let mut dlogits = vec![0.0; n * v];
        let mut g = c.benchmark_group(format!("logprobs {n}x{v}"));
        g.throughput(Throughput::Elements((n * v) as u64));
        g.bench_function("forward", |bch| {
            bch.iter(|| {
                CPU.logprobs_forward(
                    &mut logp,
                    Some(&mut ent),
                    &mut lse,
                    &logits,
                    &targets,
                    n,
                    v,
                    0.8,
                )
            })
        });
        g.bench_function("backward", |bch| {
            bch.iter(|| {
                CPU.logprobs_backward(
                    &mut dlogits,
                    &logits,
                    &targets,
                    &lse,
                    &dlogp,
                    Some(&dent),
                    n,
                    v,
                    0.8,
                )
            })
        });
        g.finish();
    }
}

/// One 1024³ sgemm call through `gemm` on all rayon threads: the best of 30 calls is printed in
/// GFLOP/s (the machine's practical matmul ceiling), then criterion times it too (its
/// throughput figure, elements/s, is FLOP/s).
fn sgemm_peak(c: &mut Criterion) {
    let n = 1024;
    let a = data(n * n, 16);
    let b = data(n * n, 17);
    let mut dst = vec![0.0f32; n * n];
    let flops = 2.0 * (n * n * n) as f64;
    let call = |dst: &mut [f32]| {
        // SAFETY: a, b and dst are distinct n×n row-major buffers.
        unsafe {
            gemm::gemm(
                n,
                n,
                n,
                dst.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(0),
            )
        }
    };
    let mut best = f64::INFINITY;
    for _ in 0..30 {
        let t0 = Instant::now();
        call(&mut dst);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    black_box(&dst);
    println!(
        "sgemm 1024x1024x1024 via gemm on {} threads: best {:.1} GFLOP/s ({:.2} ms)",
        rayon::current_num_threads(),
        flops / best / 1e9,
        best * 1e3
    );
    let mut g = c.benchmark_group("sgemm 1024^3");
    g.throughput(Throughput::Elements(flops as u64));
    g.bench_function("gemm", |bch| bch.iter(|| call(&mut dst)));
    g.finish();
}

criterion_group!(
    benches,
    sgemm_peak,
    matmul,
    matmul_decode,
    matmul_prefill,
    attention,
    layernorm,
    gelu,
    logprobs
);
criterion_main!(benches);

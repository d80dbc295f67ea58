//! `rlhf validate` and `rlhf bench kernels` on the emulated kernels (DESIGN.md principle 3).

use rlhf::backend::AttnShape;
use rlhf::validate::{
    bench_kernels, cases, validate, workspace_bytes, BenchKernelsArgs, ModelOp, Op, Precision,
    Shape, ValidateArgs,
};

/// The quick sweep covers every kernel family and passes against the CPU reference.
#[test]
fn quick_validate_passes() {
    validate(&ValidateArgs {
        quick: true,
        ..Default::default()
    })
    .expect("every kernel within tolerance");
}

/// The quick benchmark runs end to end.
#[test]
fn quick_bench_kernels_runs() {
    bench_kernels(&BenchKernelsArgs {
        quick: true,
        repeats: 1,
        ..Default::default()
    })
    .unwrap();
}

/// Every kernel family is in the sweep, on a one-token shape among others.
#[test]
fn sweep_covers_every_family() {
    let all = cases(true);
    let names: std::collections::HashSet<_> = all.iter().map(|(op, _)| op.name()).collect();
    for want in [
        "logprob_fwd f32",
        "logprob_bwd f32",
        "logprob_fwd bf16",
        "logprob_bwd bf16",
        "kl k1",
        "kl k2",
        "kl k3",
        "policy_loss grpo",
        "policy_loss bnpo",
        "policy_loss dapo",
        "policy_loss drgrpo",
        "value_loss",
        "gae",
        "group_adv",
        "reinforce_pp",
        "bt_loss",
        "dpo_loss",
        "attention f32",
        "attention bf16 tc",
        "attn_decode f32",
        "rmsnorm",
        "layernorm",
        "matmul_fwd",
        "matmul_fwd bias",
        "matmul_bwd",
        "embedding",
        "rope",
        "gelu",
        "swiglu",
        "add/scale",
        "sum_squares",
        "adamw",
        "sample greedy",
        "sample temperature",
        "sample top-k",
        "sample top-p",
        "sample top-k top-p",
    ] {
        assert!(names.contains(want), "{want} is not in the sweep");
    }
    let one_token = |s: &Shape| match *s {
        Shape::Tokens { b, t, .. } => b * t == 1,
        Shape::Attn(a) => a.b * a.t == 1,
        Shape::Rows { n, .. } | Shape::Linear { n, .. } | Shape::Flat(n) => n == 1,
    };
    for op in all.iter().map(|(op, _)| op) {
        assert!(
            all.iter().any(|(o, s)| o == op && one_token(s)),
            "{} has no one-token (one-row, one-element) case",
            op.name()
        );
    }
}

/// Attention runs at GQA ratios 1 and 4, on a single token and on T not a multiple of the 32-key
/// tile, at head dims 16, 64 and 128, on both of the backend's kernels (f32 SIMT and bf16 tensor
/// cores); decode at GQA ratios 1 and 4.
#[test]
fn attention_sweep_covers_the_odd_shapes() {
    let attn: Vec<(Op, AttnShape)> = cases(true)
        .into_iter()
        .filter_map(|(op, s)| match (op, s) {
            (Op::Model(ModelOp::Attention { .. } | ModelOp::Decode), Shape::Attn(a)) => {
                Some((op, a))
            }
            _ => None,
        })
        .collect();
    let training = |a: &&(Op, AttnShape)| matches!(a.0, Op::Model(ModelOp::Attention { .. }));
    let train: Vec<AttnShape> = attn.iter().filter(training).map(|a| a.1).collect();
    for ratio in [1, 4] {
        assert!(train.iter().any(|a| a.n_head == ratio * a.n_kv_head));
        assert!(attn
            .iter()
            .any(|(op, a)| *op == Op::Model(ModelOp::Decode) && a.n_head == ratio * a.n_kv_head));
    }
    assert!(train.iter().any(|a| a.t == 1));
    assert!(train.iter().any(|a| a.t > 32 && a.t % 32 != 0));
    for hd in [16, 64, 128] {
        assert!(train.iter().any(|a| a.head_dim == hd), "head dim {hd}");
    }
    for tensor_cores in [false, true] {
        assert!(attn
            .iter()
            .any(|(op, _)| *op == Op::Model(ModelOp::Attention { tensor_cores })));
    }
}

/// The log-prob ops' workspace is one f32 (the lse) per row whatever the vocabulary: O(B·T),
/// never O(B·T·V).
#[test]
fn logprob_workspace_is_per_row() {
    for op in [
        Op::LogprobFwd(Precision::F32),
        Op::LogprobBwd(Precision::F32),
        Op::LogprobFwd(Precision::Bf16),
        Op::LogprobBwd(Precision::Bf16),
    ] {
        for (b, t) in [(1, 1), (3, 5)] {
            for v in [7, 1000, 5003] {
                let got = workspace_bytes(op, Shape::Tokens { b, t, v });
                assert_eq!(got, b * t * 4, "{} {b}x{t}x{v}", op.name());
            }
        }
    }
}

//! `rlhf validate` and `rlhf bench kernels` on the emulated kernels (DESIGN.md principle 3).

use rlhf::validate::{
    bench_kernels, cases, validate, workspace_bytes, BenchKernelsArgs, Op, Precision, Shape,
    ValidateArgs,
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
    ] {
        assert!(names.contains(want), "{want} is not in the sweep");
    }
    assert!(all.iter().any(|(_, s)| s.b * s.t == 1));
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
                let got = workspace_bytes(op, Shape { b, t, v });
                assert_eq!(got, b * t * 4, "{} {b}x{t}x{v}", op.name());
            }
        }
    }
}

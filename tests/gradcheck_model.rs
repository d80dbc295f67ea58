//! Finite-difference check of the whole model's backward, for both families (and Qwen2's biases),
//! through the LM head's fused log-prob gathering (with temperature and entropy) and through the
//! scalar head, on a right-padded batch of rows of different lengths.

mod common;

use common::{check_grad_at, Tol};
use rlhf::backend::cpu::Cpu;
use rlhf::backend::Backend;
use rlhf::model::config::Head;
use rlhf::model::transformer::shifted_targets;
use rlhf::model::{random_params, Batch, Config, Layout, Model, Pad};
use rlhf::rng::Rng;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/models")
        .join(name)
}

/// The model is f32 and the loss sums ~40 terms of magnitude ~5, so rounding noise in the loss is
/// ~1e-5; divided by the 2e-2 step that is ~1e-3 in a numerical derivative. Gradients are
/// O(0.1..1), so 3e-3 absolute plus 2% relative separates noise from a wrong backward (a flipped
/// sign or a missing term changes an element by 100%).
const TOL: Tol = Tol {
    step: 2e-2,
    abs: 3e-3,
    rel: 2e-2,
};

fn batch() -> Batch {
    let mut rng = Rng::new(7);
    let rows: Vec<Vec<u32>> = [9usize, 6, 3]
        .iter()
        .map(|&len| (0..len).map(|_| 2 + rng.below(500) as u32).collect())
        .collect();
    Batch::new(&rows, 1, Pad::Right)
}

/// Coordinates to difference: a few from every parameter tensor (all of a small one).
fn sample_coords(layout: &Layout, per_tensor: usize, rng: &mut Rng) -> Vec<usize> {
    layout
        .params
        .iter()
        .flat_map(|p| {
            let len = p.range.len();
            let picks: Vec<usize> = if len <= per_tensor {
                p.range.clone().collect()
            } else {
                (0..per_tensor)
                    .map(|_| p.range.start + rng.below(len))
                    .collect()
            };
            picks
        })
        .collect()
}

/// `L = Σ_real r·logp + Σ_real s·entropy` at temperature 0.7, and its analytic gradient.
fn lm_loss_and_grad(
    cfg: &Config,
    params: &[f32],
    batch: &Batch,
    r: &[f32],
    s: &[f32],
) -> (f64, Vec<f32>) {
    let be = Cpu;
    let model = Model::new(&be, cfg.clone(), params).unwrap();
    let acts = model.forward(&be, batch).unwrap();
    let targets = shifted_targets(batch);
    let (logp, ent) = model
        .head_logprobs(&be, &acts.hidden, &targets, 0.7, true, 5)
        .unwrap();
    let ent = ent.unwrap();
    let loss = logp
        .iter()
        .zip(r)
        .chain(ent.iter().zip(s))
        .map(|(a, b)| (*a as f64) * (*b as f64))
        .sum();
    let mut grads = be.zeros(model.layout.total);
    let (dh, recomputed) = model
        .head_logprobs_backward(&be, &acts.hidden, &targets, 0.7, r, Some(s), 5, &mut grads)
        .unwrap();
    // SFT takes its loss from the backward's log-probs: they must be the forward's, bit for bit.
    assert!(
        recomputed
            .iter()
            .map(|x| x.to_bits())
            .eq(logp.iter().map(|x| x.to_bits())),
        "head_logprobs_backward's log-probs differ from head_logprobs'"
    );
    model.backward(&be, &acts, &dh, &mut grads);
    (loss, grads)
}

/// Per-position weights: random on positions whose next token is real, zero elsewhere.
fn position_weights(batch: &Batch, rng: &mut Rng) -> Vec<f32> {
    (0..batch.n())
        .map(|j| {
            let real_next = (j + 1) % batch.t != 0 && batch.mask[j] && batch.mask[j + 1];
            if real_next {
                rng.normal() as f32
            } else {
                0.0
            }
        })
        .collect()
}

fn check_lm(name: &str) {
    let be = Cpu;
    let model = Model::load(&be, &fixture(name)).unwrap();
    let (cfg, params) = (model.cfg.clone(), be.download(be.all(&model.params)));
    let batch = batch();
    let mut rng = Rng::new(3);
    let r = position_weights(&batch, &mut rng);
    let s: Vec<f32> = position_weights(&batch, &mut rng)
        .iter()
        .map(|x| 0.3 * x)
        .collect();
    let (_, analytic) = lm_loss_and_grad(&cfg, &params, &batch, &r, &s);
    let coords = sample_coords(&model.layout, 6, &mut rng);
    let f = |p: &[f32]| lm_loss_and_grad(&cfg, p, &batch, &r, &s).0;
    match check_grad_at(f, &params, &analytic, &coords, TOL) {
        Ok(w) => eprintln!("{name}: worst ratio {:.3} at {}", w.ratio, w.index),
        Err(e) => panic!("{name}: {e}"),
    }
}

#[test]
fn gpt2_model_gradient() {
    check_lm("gpt2");
}

#[test]
fn llama_model_gradient() {
    check_lm("llama");
}

#[test]
fn qwen2_model_gradient() {
    check_lm("qwen2");
}

/// The scalar head (critic values at every position) for both families.
#[test]
fn score_head_gradient() {
    let be = Cpu;
    for name in ["gpt2-tiny", "llama-tiny"] {
        let cfg = Config {
            head: Head::Score,
            ..Config::builtin(name, 512).unwrap()
        };
        let layout = Layout::new(&cfg);
        let params = random_params(&layout, 0.1, 11);
        let batch = batch();
        let mut rng = Rng::new(5);
        let r: Vec<f32> = batch
            .mask
            .iter()
            .map(|&m| if m { rng.normal() as f32 } else { 0.0 })
            .collect();
        let loss_and_grad = |p: &[f32]| {
            let model = Model::new(&be, cfg.clone(), p).unwrap();
            let acts = model.forward(&be, &batch).unwrap();
            let values = model.values(&be, &acts.hidden, batch.n()).unwrap();
            let loss: f64 = values
                .iter()
                .zip(&r)
                .map(|(v, r)| (*v as f64) * (*r as f64))
                .sum();
            let mut grads = be.zeros(layout.total);
            let dh = model
                .values_backward(&be, &acts.hidden, &r, batch.n(), &mut grads)
                .unwrap();
            model.backward(&be, &acts, &dh, &mut grads);
            (loss, grads)
        };
        let (_, analytic) = loss_and_grad(&params);
        let coords = sample_coords(&layout, 6, &mut rng);
        if let Err(e) = check_grad_at(|p| loss_and_grad(p).0, &params, &analytic, &coords, TOL) {
            panic!("{name} score head: {e}");
        }
    }
}

/// The check can fail: a gradient with one tensor's sign flipped (what a sign error in one
/// layer's backward produces) is caught.
#[test]
fn model_check_catches_a_wrong_backward() {
    let be = Cpu;
    let model = Model::load(&be, &fixture("llama")).unwrap();
    let (cfg, params) = (model.cfg.clone(), be.download(be.all(&model.params)));
    let batch = batch();
    let mut rng = Rng::new(3);
    let r = position_weights(&batch, &mut rng);
    let s = vec![0.0; batch.n()];
    let (_, mut analytic) = lm_loss_and_grad(&cfg, &params, &batch, &r, &s);
    let o_w = model.layout.blocks[1].o_w.clone();
    analytic[o_w.clone()].iter_mut().for_each(|g| *g = -*g);
    let coords: Vec<usize> = o_w.step_by(97).collect();
    let f = |p: &[f32]| lm_loss_and_grad(&cfg, p, &batch, &r, &s).0;
    assert!(check_grad_at(f, &params, &analytic, &coords, TOL).is_err());
}

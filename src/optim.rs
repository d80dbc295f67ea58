//! AdamW over the flat parameter buffer, global grad-norm clipping, and the learning-rate
//! schedule (linear warmup, cosine decay).

use crate::backend::{AdamW, ModelOps};
use crate::model::Layout;

/// Optimizer settings.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OptimConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Clip the global gradient norm to this value (`<= 0` disables clipping).
    pub max_grad_norm: f32,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
        }
    }
}

/// AdamW state: first and second moments in flat buffers laid out like the parameters.
pub struct Optimizer<B: ModelOps> {
    pub cfg: OptimConfig,
    pub m: B::Buf,
    pub v: B::Buf,
    /// Number of updates taken so far.
    pub step: u64,
}

impl<B: ModelOps> Optimizer<B> {
    /// Fresh state for `n` parameters.
    pub fn new(be: &B, cfg: OptimConfig, n: usize) -> Self {
        Optimizer {
            cfg,
            m: be.zeros(n),
            v: be.zeros(n),
            step: 0,
        }
    }

    /// Clips `grads` to the configured global norm and applies one AdamW update at learning rate
    /// `lr`. Weight decay skips biases and norm weights (as HF's Trainer does). Returns the
    /// gradient norm before clipping.
    pub fn update(
        &mut self,
        be: &B,
        layout: &Layout,
        params: &mut B::Buf,
        grads: &mut B::Buf,
        lr: f32,
    ) -> f32 {
        let norm = grad_norm(be, grads);
        if self.cfg.max_grad_norm > 0.0 && norm > self.cfg.max_grad_norm {
            // PyTorch's clip_grad_norm_ adds 1e-6 to the norm.
            be.scale(be.all_mut(grads), self.cfg.max_grad_norm / (norm + 1e-6));
        }
        self.step += 1;
        for p in &layout.params {
            let h = AdamW {
                lr,
                beta1: self.cfg.beta1,
                beta2: self.cfg.beta2,
                eps: self.cfg.eps,
                weight_decay: if p.decay { self.cfg.weight_decay } else { 0.0 },
                step: self.step,
            };
            let r = p.range.clone();
            be.adamw(
                be.view_mut(params, r.clone()),
                be.view(grads, r.clone()),
                be.view_mut(&mut self.m, r.clone()),
                be.view_mut(&mut self.v, r),
                h,
            );
        }
        norm
    }
}

/// The global L2 norm of a gradient buffer (deterministic: fixed-chunk reduction).
pub fn grad_norm<B: ModelOps>(be: &B, grads: &B::Buf) -> f32 {
    be.sum_squares(be.all(grads)).sqrt() as f32
}

/// Learning rate at `step` (0-based) of `total`: linear warmup reaching `base` on step
/// `warmup - 1` (so the first step already learns), then cosine decay to zero.
pub fn lr_at(base: f32, step: usize, warmup: usize, total: usize) -> f32 {
    if step < warmup {
        return base * (step + 1) as f32 / warmup as f32;
    }
    let decay = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f32 / decay as f32).min(1.0);
    base * 0.5 * (1.0 + (std::f32::consts::PI * progress).cos())
}

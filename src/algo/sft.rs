//! Supervised fine-tuning: masked, optionally weighted next-token NLL on completion tokens.

use crate::backend::ModelOps;
use crate::model::transformer::shifted_targets;
use crate::model::{Batch, Model};
use crate::{Error, Result};

/// Rows of logits computed at once by the LM head (bounds the head's memory to `chunk × V`).
pub const HEAD_CHUNK: usize = 1024;

/// Loss and gradient of the weighted next-token NLL `-Σ w·logp / Σ w` over a right-padded batch.
/// `weights[j]` weighs the prediction of token `j + 1` from position `j` (0 for prompt and pad
/// positions). Adds the gradient into `grads` and returns the loss.
pub fn nll_loss_and_grad<B: ModelOps>(
    be: &B,
    model: &Model<B>,
    batch: &Batch,
    weights: &[f32],
    grads: &mut B::Buf,
) -> Result<f32> {
    if weights.len() != batch.n() {
        return Err(Error::Invalid(format!(
            "{} loss weights for {} token positions",
            weights.len(),
            batch.n()
        )));
    }
    let total: f32 = weights.iter().sum();
    if total <= 0.0 {
        return Err(Error::Invalid("the batch has no token to learn from".into()));
    }
    let acts = model.forward(be, batch)?;
    let targets = shifted_targets(batch);
    let (logp, _) = model.head_logprobs(be, &acts.hidden, &targets, 1.0, false, HEAD_CHUNK)?;
    let loss = -logp.iter().zip(weights).map(|(l, w)| (l * w) as f64).sum::<f64>() / total as f64;
    let dlogp: Vec<f32> = weights.iter().map(|w| -w / total).collect();
    let dhidden = model.head_logprobs_backward(be, &acts.hidden, &targets, 1.0, &dlogp, None, HEAD_CHUNK, grads)?;
    model.backward(be, &acts, &dhidden, grads);
    Ok(loss as f32)
}

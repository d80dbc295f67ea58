//! The transformer: configuration, parameter layout, Hugging Face I/O, forward and backward.

pub mod config;
pub mod generate;
pub mod layout;
pub mod pool;
pub mod tokenizer;
pub mod transformer;
pub mod weights;

pub use config::Config;
pub use layout::Layout;

use crate::backend::ModelOps;
use crate::rng::Rng;
use crate::Result;
use std::path::Path;
pub use transformer::{Batch, Model, Pad};

/// Random initial parameters, as transformers initialises: matrices from N(0, std²), norm
/// weights 1, biases 0.
pub fn random_params(layout: &Layout, std: f32, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let mut params = vec![0.0; layout.total];
    for p in &layout.params {
        let dst = &mut params[p.range.clone()];
        if p.shape.len() == 2 {
            dst.iter_mut()
                .for_each(|x| *x = (rng.normal() * std as f64) as f32);
        } else if p.name.ends_with("_w") {
            dst.fill(1.0);
        }
    }
    params
}

impl<B: ModelOps> Model<B> {
    /// Loads a Hugging Face model directory (`config.json` and `model.safetensors`).
    pub fn load(be: &B, dir: &Path) -> Result<Model<B>> {
        let cfg = Config::load(dir)?;
        let layout = Layout::new(&cfg);
        let params = weights::load_params(dir, &cfg, &layout)?;
        Model::new(be, cfg, &params)
    }

    /// Saves the model as a Hugging Face directory (`config.json`, `model.safetensors`).
    pub fn save(&self, be: &B, dir: &Path, dtype: weights::SaveDtype) -> Result<()> {
        let params = be.download(be.all(&self.params));
        weights::save_model(dir, &self.cfg, &self.layout, &params, dtype)
    }
}

//! rlhf: a single-node RLHF training engine.
//!
//! One transformer (`model`), written once against the [`backend::Backend`] trait, with an
//! explicit backward pass; the rayon CPU backend (`backend::cpu`) is the numerical reference.

pub mod algo;
pub mod backend;
pub mod bench;
pub mod builtin_task;
pub mod checkpoint;
pub mod data;
pub mod demo;
pub mod error;
pub mod metrics;
pub mod model;
pub mod model_parity;
pub mod optim;
pub mod plot;
pub mod reward;
pub mod rng;
pub mod rollout;
pub mod validate;

pub use error::{Error, Result};

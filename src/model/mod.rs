//! The transformer: configuration, parameter layout, Hugging Face I/O, forward and backward.

pub mod config;
pub mod layout;
pub mod tokenizer;
pub mod transformer;
pub mod weights;

pub use config::Config;
pub use layout::Layout;

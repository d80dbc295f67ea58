//! The training objectives: each a loss and a loop.

pub mod sft;
pub mod reward;

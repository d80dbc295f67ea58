//! The training objectives: each a loss and a loop.

pub mod dpo;
pub mod grpo;
pub mod ppo;
pub mod reward;
pub mod sft;

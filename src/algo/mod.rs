//! The training objectives: each a loss and a loop.

pub mod grpo;
pub mod ppo;
pub mod sft;
pub mod reward;
pub mod dpo;

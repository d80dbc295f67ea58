//! The training objectives: each a loss and a loop.

pub mod dpo;
pub mod grpo;
pub mod ppo;
pub mod reward;
pub mod sft;

/// A trainer's arguments as the command line gives them with no flags: one source of truth
/// for its defaults (clap's), for the `Default` impls.
fn clap_defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults").no_binary_name(true));
    let matches = cmd.get_matches_from(std::iter::empty::<String>());
    T::from_arg_matches(&matches).expect("the defaults parse")
}

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

/// Evaluates `$body` with `$be` bound to the backend that `$device` (a
/// [`DeviceChoice`](crate::backend::cuda::DeviceChoice)) selects — `&Cpu`, `&Cuda` or `&Emu` —
/// and prints which device that is; an error where the choice cannot be met. A macro because
/// the backends are different types and the trainers are generic over them.
#[macro_export]
macro_rules! with_backend {
    ($device:expr, |$be:ident| $body:expr) => {{
        use $crate::backend::cuda::Selected;
        match $device
            .select()
            .map_err(|e| anyhow::anyhow!("--device: {e} (--device cpu runs on the CPU backend)"))?
        {
            Selected::Cpu => {
                let $be = &$crate::backend::cpu::Cpu;
                $body
            }
            Selected::Cuda(cuda) => {
                eprintln!("{}", cuda.info());
                let $be = &*cuda;
                $body
            }
            Selected::Emu => {
                eprintln!(
                    "running the CUDA kernels on the emulator (CPU shim): slow, for checking"
                );
                let $be = &$crate::backend::emu::Emu::default();
                $body
            }
        }
    }};
}

//! `--device cpu|cuda|auto`: which backend a command runs its kernels on.

use super::{Cuda, CudaError};

/// The device a command asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    /// The CPU, whatever is installed.
    Cpu,
    /// CUDA device 0 (select another with `CUDA_VISIBLE_DEVICES`); an error where there is none.
    Cuda,
    /// CUDA device 0 where one opens, else the CPU with a one-line notice on stderr.
    #[default]
    Auto,
}

/// What a [`DeviceChoice`] resolved to.
#[derive(Debug)]
pub enum Selected {
    /// Run on the CPU.
    Cpu,
    /// Run on this device.
    Cuda(Box<Cuda>),
}

/// The notice `--device auto` prints when it falls back to the CPU: why no device opened.
pub fn fallback_notice(e: &CudaError) -> String {
    format!("{e}; running on the CPU")
}

impl DeviceChoice {
    /// Opens the device asked for. `Auto` never fails: where no device opens (no driver, no
    /// GPU, no NVRTC, ...) it prints [`fallback_notice`] on stderr and selects the CPU.
    pub fn select(self) -> Result<Selected, CudaError> {
        match self {
            DeviceChoice::Cpu => Ok(Selected::Cpu),
            DeviceChoice::Cuda => Ok(Selected::Cuda(Box::new(Cuda::open(0)?))),
            DeviceChoice::Auto => match Cuda::open(0) {
                Ok(cuda) => Ok(Selected::Cuda(Box::new(cuda))),
                Err(e) => {
                    eprintln!("{}", fallback_notice(&e));
                    Ok(Selected::Cpu)
                }
            },
        }
    }
}

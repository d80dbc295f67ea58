//! `--device cpu|cuda|emu|auto`: which backend a command runs on.

use super::{Cuda, CudaError};

/// The device a command asks for.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// The CPU, whatever is installed.
    Cpu,
    /// CUDA device 0 (select another with `CUDA_VISIBLE_DEVICES`); an error where there is none.
    Cuda,
    /// The CUDA kernels on the CPU through the emulation shim: the GPU code path without a GPU,
    /// for checking it (slow: every CUDA thread is a fiber).
    Emu,
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
    /// Run the kernels on the emulator.
    Emu,
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
            DeviceChoice::Emu => Ok(Selected::Emu),
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

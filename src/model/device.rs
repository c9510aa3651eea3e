//! Where a model runs: `cpu` or `cuda[:N]`, and the dtype its weights and activations use.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use super::error::{ModelError, Result};
use super::kernels::CpuKernels;

/// What this build says when CUDA is asked for and the `cuda` feature is off.
pub const NO_CUDA: &str = "this plait was built without CUDA: build it with `--features cuda` \
     (scripts/build-cuda.sh does, also on a machine without a CUDA toolkit)";

/// A device named on the command line or in config.toml.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum DeviceSpec {
    /// The CPU (the default).
    #[default]
    Cpu,
    /// The CUDA GPU of this ordinal.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        match text {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => text
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device `{text}` (expected cpu, cuda or cuda:N)")),
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = String;

    fn try_from(text: String) -> std::result::Result<Self, String> {
        text.parse()
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Whether this build can open the device (CUDA needs the `cuda` feature).
    pub fn is_available(self) -> bool {
        self == Self::Cpu || cfg!(feature = "cuda")
    }

    /// Opens the device; a CUDA device in a build without the feature says how to get one.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(_) if !self.is_available() => Err(ModelError::Device(NO_CUDA.into())),
            Self::Cuda(n) => Device::new_cuda(n)
                .map_err(|e| ModelError::Device(format!("cannot open cuda:{n}: {e}"))),
        }
    }
}

/// Parses a compute dtype name: `f32`, `bf16` or `f16`.
pub fn parse_dtype(name: &str) -> std::result::Result<DType, String> {
    match name {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        _ => Err(format!(
            "unknown dtype `{name}` (expected f32, bf16 or f16)"
        )),
    }
}

/// A device and the dtype a safetensors checkpoint is converted to on it.
#[derive(Debug, Clone)]
pub struct Placement {
    /// Where the weights and the cache live.
    pub device: Device,
    /// Weights' and activations' dtype (GGUF models compute in f32 whatever this says).
    pub dtype: DType,
    /// What runs decode on the CPU (ignored on other devices).
    pub kernels: CpuKernels,
}

impl Placement {
    /// `device` with `dtype`, or its default: f32 on the CPU, bf16 on an accelerator; the
    /// widest CPU kernels.
    pub fn new(device: Device, dtype: Option<DType>) -> Self {
        let default = if device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        };
        Self {
            dtype: dtype.unwrap_or(default),
            device,
            kernels: CpuKernels::widest(),
        }
    }

    /// Opens `spec` with `dtype` or the device's default dtype, and the CPU kernels that
    /// `PLAIT_CPU_KERNELS` names (an unknown or unsupported one is an error).
    pub fn open(spec: DeviceSpec, dtype: Option<DType>) -> Result<Self> {
        let kernels = CpuKernels::from_env()?;
        Ok(Self::new(spec.open()?, dtype).with_kernels(kernels))
    }

    /// The same placement with `kernels` for decode on the CPU.
    pub fn with_kernels(self, kernels: CpuKernels) -> Self {
        Self { kernels, ..self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_print_back() {
        for (text, spec) in [
            ("cpu", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
        ] {
            assert_eq!(text.parse::<DeviceSpec>().unwrap(), spec);
        }
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
        for bad in ["gpu", "cuda:", "cuda:x", "CPU", "cuda:-1"] {
            let e = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{e}");
        }
    }

    #[test]
    fn cpu_defaults_to_f32() {
        let p = Placement::open(DeviceSpec::Cpu, None).unwrap();
        assert!(p.device.is_cpu());
        assert_eq!(p.dtype, DType::F32);
        assert_eq!(
            Placement::new(Device::Cpu, Some(DType::BF16)).dtype,
            DType::BF16
        );
        assert_eq!(parse_dtype("f16"), Ok(DType::F16));
        assert!(parse_dtype("f64").is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_build_it() {
        let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
    }
}

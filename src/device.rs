//! Where a run computes and in what precision: `--device auto|cpu|cuda[:N]` and
//! `--precision fp32|bf16|f16`. The frozen base runs in the chosen precision; LoRA master
//! weights, AdamW state and the loss stay in f32 whatever it is.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A device named on the command line or in a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    /// The first CUDA device when this build has CUDA and one opens, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl DeviceSpec {
    /// Opens the device; a CUDA request on a build without CUDA says how to get one.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Auto => Ok(Self::Cuda(0).open().unwrap_or(Device::Cpu)),
            DeviceSpec::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(Error::Invalid(format!(
                        "device cuda:{n}: this lorasft was built without CUDA (build it with \
                         scripts/build-cuda.sh, i.e. `cargo build --release --features cuda`)"
                    )));
                }
                Device::new_cuda(n)
                    .map_err(|e| Error::Invalid(format!("device cuda:{n} cannot be opened: {e}")))
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| {
                    Error::Invalid(format!("device {s:?}: expected auto, cpu, cuda or cuda:N"))
                }),
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = Error;

    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> Self {
        d.to_string()
    }
}

/// The precision of the frozen base and the activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit float everywhere: the reference's setting, bitwise reproducible on CPU.
    #[default]
    Fp32,
    /// bfloat16 base and activations: f32's range, no loss scaling needed.
    Bf16,
    /// IEEE half base and activations, with dynamic loss scaling.
    F16,
}

impl Precision {
    /// The dtype of the base weights and activations.
    pub fn dtype(self) -> DType {
        match self {
            Precision::Fp32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }

    /// Whether gradients need dynamic loss scaling (f16's narrow range underflows them).
    pub fn needs_loss_scaling(self) -> bool {
        self == Precision::F16
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        })
    }
}

/// The device a tensor lives on, as run records name it: "cpu", "cuda:N" or "metal:N".
pub fn describe(dev: &Device) -> String {
    match dev.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The instruction set the CPU kernels run with on this machine: gemm's products use AVX-512F
/// where the CPU has it and the build has the `avx512` feature (gemm's `x86-v4` kernels),
/// else AVX2 + FMA; lorasft's own kernels use AVX2 + FMA. Kernels of different widths round
/// differently, so the manifest records this beside the thread count: bit-identity holds for
/// a given pair.
pub fn cpu_kernels() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        if cfg!(feature = "avx512") && is_x86_feature_detected!("avx512f") {
            return "products: AVX-512F; element-wise: AVX2+FMA".into();
        }
        if avx2 {
            return "products and element-wise: AVX2+FMA".into();
        }
        "x86-64 without AVX2 (scalar and SSE kernels)".into()
    }
    #[cfg(not(target_arch = "x86_64"))]
    std::env::consts::ARCH.to_string()
}

/// The dtype adapters, optimizer state and the loss use for a base in `dtype`: f64 for f64
/// (the exactness tests), f32 otherwise.
pub fn master_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse_and_print_back() {
        for (text, spec) in [
            ("auto", DeviceSpec::Auto),
            ("cpu", DeviceSpec::Cpu),
            ("cuda:0", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
        ] {
            assert_eq!(text.parse::<DeviceSpec>().unwrap(), spec);
            assert_eq!(spec.to_string(), text);
        }
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        let err = "gpu".parse::<DeviceSpec>().unwrap_err().to_string();
        assert!(err.contains("auto, cpu, cuda or cuda:N"), "{err}");
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn auto_and_cpu_open_on_a_machine_without_a_gpu() {
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
        assert_eq!(describe(&DeviceSpec::Cpu.open().unwrap()), "cpu");
        // Auto falls back to the CPU when no CUDA device opens (always, in a CPU build).
        if !candle_core::utils::cuda_is_available() {
            assert!(DeviceSpec::Auto.open().unwrap().is_cpu());
            let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
            assert!(err.contains("scripts/build-cuda.sh"), "{err}");
        }
    }

    #[test]
    fn precision_maps_to_dtypes_and_only_f16_scales_the_loss() {
        assert_eq!(Precision::Fp32.dtype(), DType::F32);
        assert_eq!(Precision::Bf16.dtype(), DType::BF16);
        assert_eq!(Precision::F16.dtype(), DType::F16);
        assert!(Precision::F16.needs_loss_scaling());
        assert!(!Precision::Bf16.needs_loss_scaling() && !Precision::Fp32.needs_loss_scaling());
        assert_eq!(master_dtype(DType::BF16), DType::F32);
        assert_eq!(master_dtype(DType::F64), DType::F64);
    }
}

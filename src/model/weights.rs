//! Memory-mapped safetensors checkpoints: one file or shards listed by an index.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::device::Placement;
use super::error::{candle_message, ModelError, Result};

/// The weights of a checkpoint directory, memory-mapped, not yet loaded.
pub struct Checkpoint {
    files: Vec<MmapedSafetensors>,
    routing: HashMap<String, usize>,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

impl Checkpoint {
    /// Maps `model.safetensors`, or the shards named by `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        if index_path.exists() {
            Self::open_sharded(dir, &index_path)
        } else if single.exists() {
            let file = map_file(&single)?;
            let routing = file_tensor_names(&file).map(|n| (n, 0)).collect();
            Ok(Self {
                files: vec![file],
                routing,
            })
        } else {
            Err(ModelError::NotFound {
                what: "weights (model.safetensors or model.safetensors.index.json)",
                path: dir.to_path_buf(),
            })
        }
    }

    fn open_sharded(dir: &Path, index_path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index_path).map_err(|source| ModelError::Io {
            path: index_path.to_path_buf(),
            source,
        })?;
        let de = &mut serde_json::Deserializer::from_str(&text);
        let index: ShardIndex =
            serde_path_to_error::deserialize(de).map_err(|e| ModelError::Config {
                path: index_path.to_path_buf(),
                field: e.path().to_string(),
                message: e.inner().to_string(),
            })?;
        // Sorted so that the shard order, and so any error, is deterministic.
        let mut entries: Vec<(&String, &String)> = index.weight_map.iter().collect();
        entries.sort();
        let mut shard_ids: HashMap<&str, usize> = HashMap::new();
        let mut shard_paths: Vec<PathBuf> = Vec::new();
        let mut routing = HashMap::new();
        for (tensor, shard) in entries {
            let id = match shard_ids.get(shard.as_str()) {
                Some(id) => *id,
                None => {
                    let path = dir.join(shard);
                    if !path.is_file() {
                        return Err(ModelError::MissingShard {
                            index: index_path.to_path_buf(),
                            shard: shard.clone(),
                            tensor: tensor.clone(),
                        });
                    }
                    shard_paths.push(path);
                    shard_ids.insert(shard, shard_paths.len() - 1);
                    shard_paths.len() - 1
                }
            };
            routing.insert(tensor.clone(), id);
        }
        let files = shard_paths
            .iter()
            .map(|p| map_file(p))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { files, routing })
    }

    /// The stored shape of a tensor, if the checkpoint has it.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let file = &self.files[*self.routing.get(name)?];
        file.get(name).ok().map(|v| v.shape().to_vec())
    }

    /// Loads a tensor after checking its shape, converted to `dtype` on `device`.
    pub fn load(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let missing = || ModelError::MissingTensor {
            name: name.to_string(),
        };
        let file = &self.files[*self.routing.get(name).ok_or_else(missing)?];
        let view = file.get(name).map_err(|_| missing())?;
        if view.shape() != shape {
            return Err(ModelError::TensorShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        let unsupported = |dtype: String| ModelError::TensorDtype {
            name: name.to_string(),
            dtype,
        };
        // One tensor at a time: the stored copy is dropped as soon as it is converted,
        // so peak memory stays near the size of the computed weights.
        let stored = file
            .load(name, device)
            .map_err(|e| unsupported(candle_message(&e)))?;
        if !matches!(stored.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            return Err(unsupported(stored.dtype().as_str().to_string()));
        }
        Ok(stored.to_dtype(dtype)?)
    }
}

fn map_file(path: &Path) -> Result<MmapedSafetensors> {
    // SAFETY: the mapping is read-only; plait never writes checkpoint files, and a file
    // changed by another process while mapped is outside what any mmap-based loader guards.
    unsafe { MmapedSafetensors::new(path) }.map_err(|e| ModelError::Safetensors {
        path: path.to_path_buf(),
        message: candle_message(&e),
    })
}

fn file_tensor_names(file: &MmapedSafetensors) -> impl Iterator<Item = String> + '_ {
    file.tensors().into_iter().map(|(name, _)| name)
}

/// Where a model's tensors come from, asked for by their Hugging Face names.
pub(crate) trait WeightSource {
    /// A weight matrix `[out, in]`, kept quantized when the source stores it so.
    fn matrix(&mut self, name: &str, shape: &[usize]) -> Result<QMatMul>;
    /// A (small) tensor in the compute dtype: norms, biases.
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor>;
    /// Whether the source holds a tensor.
    fn contains(&self, name: &str) -> bool;
    /// Whether an absent `lm_head.weight` means a head tied to the embedding (GGUF's rule).
    fn ties_missing_head(&self) -> bool {
        false
    }
    /// Whether absent PLT gates are made identity gates (a non-looped model, lifted).
    fn lifts_missing_gates(&self) -> bool {
        false
    }
    /// Whether q/k rows are stored permuted for interleaved RoPE.
    fn rope_interleaved(&self) -> bool {
        false
    }
}

/// A safetensors checkpoint converted to one dtype on one device.
pub(crate) struct SafetensorsWeights {
    checkpoint: Checkpoint,
    dtype: DType,
    device: Device,
}

impl SafetensorsWeights {
    pub(crate) fn new(checkpoint: Checkpoint, dtype: DType, device: &Device) -> Self {
        Self {
            checkpoint,
            dtype,
            device: device.clone(),
        }
    }
}

impl WeightSource for SafetensorsWeights {
    fn matrix(&mut self, name: &str, shape: &[usize]) -> Result<QMatMul> {
        self.tensor(name, shape).map(QMatMul::Tensor)
    }

    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.checkpoint.load(name, shape, self.dtype, &self.device)
    }

    fn contains(&self, name: &str) -> bool {
        self.checkpoint.shape(name).is_some()
    }
}

/// Random weights made on the device, for benchmarks of checkpoints one does not have:
/// matrices N(0, 0.02) (the usual init scale, so activations stay finite), norms 1, biases 0.
pub(crate) struct RandomWeights {
    dtype: DType,
    device: Device,
    /// Matrices quantized to this type where their width is a multiple of its block.
    quant: Option<GgmlDType>,
}

impl RandomWeights {
    /// Weights in `placement`'s dtype on its device (unseeded: speed does not depend on
    /// them), the matrices quantized to `quant` if given (then the rest in f32).
    pub(crate) fn new(placement: &Placement, quant: Option<GgmlDType>) -> Self {
        Self {
            dtype: if quant.is_some() {
                DType::F32
            } else {
                placement.dtype
            },
            device: placement.device.clone(),
            quant,
        }
    }

    /// The dtype of the non-quantized weights, the model's compute dtype.
    pub(crate) fn dtype(&self) -> DType {
        self.dtype
    }
}

impl WeightSource for RandomWeights {
    fn matrix(&mut self, _name: &str, shape: &[usize]) -> Result<QMatMul> {
        // Drawn in f32 (not every backend draws half precision) and converted at once.
        let t = Tensor::randn(0f32, 0.02, shape, &self.device)?;
        let width = shape.last().copied().unwrap_or(0);
        match self.quant {
            Some(q) if width % q.block_size() == 0 => {
                Ok(QMatMul::from_qtensor(QTensor::quantize(&t, q)?)?)
            }
            _ => Ok(QMatMul::Tensor(t.to_dtype(self.dtype)?)),
        }
    }

    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = if name.ends_with("bias") {
            Tensor::zeros(shape, self.dtype, &self.device)?
        } else if name.ends_with("norm.weight") {
            Tensor::ones(shape, self.dtype, &self.device)?
        } else {
            Tensor::randn(0f32, 0.02, shape, &self.device)?.to_dtype(self.dtype)?
        };
        Ok(t)
    }

    fn contains(&self, _name: &str) -> bool {
        true
    }
}

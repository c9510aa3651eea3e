//! Per-sequence PLT state: loop 0's full K/V, rings for loops >= 1, and the carries.

use candle_core::{DType, Device, Tensor};

use super::error::Result;

/// Positions loop 0's cache grows by when it runs out of room.
const GROW_POSITIONS: usize = 512;

/// Shapes the cache needs from the model.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CacheShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub window: usize,
    /// Of the carries (the model's compute dtype).
    pub dtype: DType,
    /// Of the K/V: the compute dtype, or f16 on the CPU for a quantized model.
    pub kv_dtype: DType,
}

/// The KV state of one sequence, passed into the model's forward functions.
///
/// Loop 0 keeps K/V for every position (it does not depend on the loop count). Each loop
/// l >= 1 keeps a ring of its last window+1 K/V per layer (slot = position mod (window+1))
/// and loop l-1's last output, the carry it reads at the next position.
pub struct PltCache {
    pub(crate) shape: CacheShape,
    pub(crate) device: Device,
    /// Token ids whose positions are cached, in order.
    pub(crate) tokens: Vec<u32>,
    pub(crate) loops: usize,
    /// Per layer, `[kv_heads, capacity, head_dim]`; positions `0..tokens.len()` are valid.
    pub(crate) k0: Vec<Tensor>,
    pub(crate) v0: Vec<Tensor>,
    pub(crate) capacity: usize,
    /// Per layer, `[loops-1, kv_heads, window+1, head_dim]`; empty at one loop.
    pub(crate) ring_k: Vec<Tensor>,
    pub(crate) ring_v: Vec<Tensor>,
    /// Ring slots holding positions below this are not valid (state was rebuilt from here).
    pub(crate) ring_valid_from: usize,
    /// `[loops-1, hidden]`: row l is loop l's output at the last cached position.
    pub(crate) carries: Option<Tensor>,
    /// Positions run through the model since the cache was made (all loops of a position count once).
    pub(crate) computed_positions: u64,
}

impl PltCache {
    pub(crate) fn new(shape: CacheShape, device: &Device, loops: usize) -> Result<Self> {
        let mut cache = Self {
            shape,
            device: device.clone(),
            tokens: Vec::new(),
            loops,
            k0: Vec::new(),
            v0: Vec::new(),
            capacity: 0,
            ring_k: Vec::new(),
            ring_v: Vec::new(),
            ring_valid_from: 0,
            carries: None,
            computed_positions: 0,
        };
        cache.reset_upper_loops(loops, 0)?;
        Ok(cache)
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether no position is cached.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The token ids whose positions are cached.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// How many leading positions of `tokens` this cache already holds.
    pub fn shared_prefix(&self, tokens: &[u32]) -> usize {
        self.tokens
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// The loop count the cached state was computed for.
    pub fn loops(&self) -> usize {
        self.loops
    }

    /// Positions run through the model since this cache was made.
    pub fn computed_positions(&self) -> u64 {
        self.computed_positions
    }

    /// Bytes held by the cache's tensors.
    pub fn size_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        self.k0
            .iter()
            .chain(&self.v0)
            .chain(&self.ring_k)
            .chain(&self.ring_v)
            .chain(self.carries.as_ref())
            .map(bytes)
            .sum()
    }

    /// A new cache holding a copy of loop 0's K/V for the first `len` positions; loops >= 1
    /// start empty (valid from `len`), to be rebuilt by the model.
    pub(crate) fn copy_prefix(&self, len: usize) -> Result<Self> {
        let len = len.min(self.len());
        let mut copy = Self::new(self.shape, &self.device, self.loops)?;
        if len > 0 {
            copy.reserve(len)?;
            for (dst, src) in copy
                .k0
                .iter()
                .zip(&self.k0)
                .chain(copy.v0.iter().zip(&self.v0))
            {
                // A copy, not a shared view: the two caches are written independently.
                dst.slice_set(&src.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
            }
        }
        copy.tokens = self.tokens[..len].to_vec();
        copy.ring_valid_from = len;
        Ok(copy)
    }

    /// Fills a fresh cache with `tokens`' positions of random K/V, ring entries and
    /// carries, with room for `room` more positions (see `PltModel::random_context`).
    pub(crate) fn fill_random(&mut self, tokens: &[u32], room: usize) -> Result<()> {
        self.reserve(tokens.len() + room)?;
        let random = |t: &Tensor| -> Result<Tensor> {
            let r = Tensor::randn(0f32, 1f32, t.shape(), &self.device)?;
            Ok(r.to_dtype(t.dtype())?)
        };
        let fill = |ts: &[Tensor]| ts.iter().map(random).collect::<Result<Vec<_>>>();
        (self.k0, self.v0) = (fill(&self.k0)?, fill(&self.v0)?);
        (self.ring_k, self.ring_v) = (fill(&self.ring_k)?, fill(&self.ring_v)?);
        self.carries = self.carries.as_ref().map(random).transpose()?;
        self.tokens.extend_from_slice(tokens);
        self.ring_valid_from = 0;
        Ok(())
    }

    /// Makes room in loop 0's cache for `needed` positions, growing in chunks (amortized).
    pub(crate) fn reserve(&mut self, needed: usize) -> Result<()> {
        if needed <= self.capacity {
            return Ok(());
        }
        let s = self.shape;
        let new_capacity = needed.max(self.capacity * 2).max(GROW_POSITIONS);
        let len = self.len();
        let grow = |old: Option<&Tensor>| -> Result<Tensor> {
            let fresh = Tensor::zeros(
                (s.kv_heads, new_capacity, s.head_dim),
                s.kv_dtype,
                &self.device,
            )?;
            if let Some(old) = old {
                if len > 0 {
                    fresh.slice_set(&old.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                }
            }
            Ok(fresh)
        };
        let mut k0 = Vec::with_capacity(s.layers);
        let mut v0 = Vec::with_capacity(s.layers);
        for layer in 0..s.layers {
            k0.push(grow(self.k0.get(layer))?);
            v0.push(grow(self.v0.get(layer))?);
        }
        self.k0 = k0;
        self.v0 = v0;
        self.capacity = new_capacity;
        Ok(())
    }

    /// Clears the state of loops >= 1 for `loops` loops; rings count as valid from `valid_from`.
    pub(crate) fn reset_upper_loops(&mut self, loops: usize, valid_from: usize) -> Result<()> {
        let s = self.shape;
        self.loops = loops;
        self.ring_valid_from = valid_from;
        if loops == 1 {
            self.ring_k.clear();
            self.ring_v.clear();
            self.carries = None;
            return Ok(());
        }
        let ring = (loops - 1, s.kv_heads, s.window + 1, s.head_dim);
        self.ring_k = (0..s.layers)
            .map(|_| Tensor::zeros(ring, s.kv_dtype, &self.device))
            .collect::<candle_core::Result<_>>()?;
        self.ring_v = (0..s.layers)
            .map(|_| Tensor::zeros(ring, s.kv_dtype, &self.device))
            .collect::<candle_core::Result<_>>()?;
        self.carries = Some(Tensor::zeros((loops - 1, s.hidden), s.dtype, &self.device)?);
        Ok(())
    }

    /// Keeps only the state of the first `loops` loops (which does not depend on later ones).
    pub(crate) fn drop_upper_loops(&mut self, loops: usize) -> Result<()> {
        if loops == 1 {
            return self.reset_upper_loops(1, self.ring_valid_from);
        }
        let keep = |t: &Tensor| t.narrow(0, 0, loops - 1).and_then(|t| t.contiguous());
        self.ring_k = self
            .ring_k
            .iter()
            .map(keep)
            .collect::<candle_core::Result<_>>()?;
        self.ring_v = self
            .ring_v
            .iter()
            .map(keep)
            .collect::<candle_core::Result<_>>()?;
        self.carries = self.carries.as_ref().map(keep).transpose()?;
        self.loops = loops;
        Ok(())
    }

    /// Position held by ring slot `slot` when positions `..=last` have been written, if valid.
    pub(crate) fn ring_slot_position(&self, slot: usize, last: usize) -> Option<usize> {
        let w1 = self.shape.window + 1;
        let back = (last + w1 - slot % w1) % w1;
        let pos = last.checked_sub(back)?;
        (pos >= self.ring_valid_from).then_some(pos)
    }
}

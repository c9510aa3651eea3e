//! The conversations' kept caches: several, least recently used dropped first when their
//! bytes pass a budget; each request is served from the longest cached token prefix.

use crate::model::{PltCache, PltModel, Result};

/// One kept cache and what it was last used for.
struct Kept {
    /// The conversation it belongs to, when the client named one.
    key: Option<String>,
    cache: PltCache,
    /// Tick of its last use (higher is more recent).
    used: u64,
}

/// The caches the worker keeps between requests.
pub(crate) struct CachePool {
    kept: Vec<Kept>,
    /// Bytes the kept caches may hold together (the one in use is never dropped).
    budget: usize,
    tick: u64,
}

/// A cache taken out of the pool to serve one request.
pub(crate) struct Checkout {
    /// The cache, holding a prefix of the prompt (possibly empty).
    pub cache: PltCache,
    /// The key it is kept under afterwards.
    pub key: Option<String>,
}

impl CachePool {
    /// An empty pool whose caches may hold `budget` bytes together.
    pub(crate) fn new(budget: usize) -> Self {
        Self {
            kept: Vec::new(),
            budget,
            tick: 0,
        }
    }

    /// The cache to continue `prompt` in, with `loops` loops: the kept cache sharing the
    /// longest token prefix with it (on a tie, the one kept under `key`). A cache that holds
    /// more than the shared prefix is taken over only when it is `key`'s own (the same
    /// conversation, edited); otherwise the shared prefix is copied, so the other
    /// conversation keeps its cache.
    pub(crate) fn checkout(
        &mut self,
        model: &PltModel,
        prompt: &[u32],
        key: Option<&str>,
        loops: usize,
    ) -> Result<Checkout> {
        let own = |kept: &Kept| key.is_some() && kept.key.as_deref() == key;
        let best = self
            .kept
            .iter()
            .enumerate()
            .map(|(i, kept)| (kept.cache.shared_prefix(prompt), own(kept), kept.used, i))
            .max();
        let mut cache = match best {
            Some((common, is_own, _, i)) if common > 0 => {
                let whole = common == self.kept[i].cache.len();
                if whole || is_own {
                    self.kept.swap_remove(i).cache
                } else {
                    model.fork_cache(&self.kept[i].cache, common)?
                }
            }
            _ => model.new_cache(loops)?,
        };
        if cache.loops() != loops {
            model.set_loops(&mut cache, loops)?;
        }
        Ok(Checkout {
            cache,
            key: key.map(str::to_owned),
        })
    }

    /// Keeps `cache` after its request, replacing the cache kept under the same key, and
    /// drops the least recently used others while the pool and the `running` bytes of the
    /// answers still running are over the budget.
    pub(crate) fn keep(&mut self, checkout: Checkout, running: usize) {
        if let Some(key) = &checkout.key {
            self.kept.retain(|kept| kept.key.as_ref() != Some(key));
        }
        self.tick += 1;
        self.kept.push(Kept {
            key: checkout.key,
            cache: checkout.cache,
            used: self.tick,
        });
        self.trim(running);
    }

    /// Drops the least recently used kept caches while they and the `running` bytes are
    /// over the budget; the most recent one stays while nothing runs.
    pub(crate) fn trim(&mut self, running: usize) {
        let floor = usize::from(running == 0);
        while self.kept.len() > floor && self.bytes() + running > self.budget {
            let oldest = self
                .kept
                .iter()
                .enumerate()
                .min_by_key(|(_, kept)| kept.used)
                .map(|(i, _)| i);
            if let Some(i) = oldest {
                self.kept.swap_remove(i);
            }
        }
    }

    /// Bytes the kept caches hold.
    pub(crate) fn bytes(&self) -> usize {
        self.kept.iter().map(|kept| kept.cache.size_bytes()).sum()
    }

    /// Drops every kept cache.
    pub(crate) fn clear(&mut self) {
        self.kept.clear();
    }
}

/// The default budget of kept caches: an eighth of the machine's memory, within 256 MiB and
/// 8 GiB (1 GiB where the memory cannot be read).
pub fn default_cache_budget() -> usize {
    const MIB: usize = 1 << 20;
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        });
    total.map_or(1024 * MIB, |bytes| (bytes / 8).clamp(256 * MIB, 8192 * MIB))
}

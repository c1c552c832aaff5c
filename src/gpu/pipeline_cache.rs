//! wgpu's pipeline cache, kept on disk between processes. Where the driver fills it (the
//! Vulkan drivers of discrete GPUs do), a fresh process loads the machine code of the
//! pipelines an earlier one compiled instead of compiling them again, which is most of what a
//! first training step costs beyond a later one. Lavapipe offers the feature but stores
//! nothing in it (its data is the driver's header alone), so there it changes nothing.
//!
//! The file is named by `wgpu::util::pipeline_cache_key` (the adapter's vendor and device);
//! wgpu and the driver check its header and start empty when it came from another driver
//! version. It is written whole to a temporary file of its writer's own and renamed over the
//! old one, so neither a crash nor two processes saving at once leave half a cache.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{Error, Result};

/// Environment variable naming the folder that holds pipeline caches; set but empty, no cache
/// is read or written. Unset: `$XDG_CACHE_HOME/es2-wgpu`, else `$HOME/.cache/es2-wgpu`.
pub const CACHE_DIR_ENV: &str = "ES2_WGPU_CACHE_DIR";

/// Where a device keeps wgpu's pipeline cache between processes (on adapters whose driver
/// has one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PipelineCacheDir {
    /// The folder [`CACHE_DIR_ENV`] names, else the user's cache folder.
    #[default]
    Default,
    /// This folder.
    At(std::path::PathBuf),
    /// No cache on disk.
    Off,
}

/// Where pipeline caches live by default ([`CACHE_DIR_ENV`]), or `None` for no cache.
pub fn default_cache_dir() -> Option<PathBuf> {
    use std::env::var_os;
    if let Some(dir) = var_os(CACHE_DIR_ENV) {
        return (!dir.is_empty()).then(|| PathBuf::from(dir));
    }
    let absolute = |v: std::ffi::OsString| Some(PathBuf::from(v)).filter(|p| p.is_absolute());
    var_os("XDG_CACHE_HOME")
        .and_then(absolute)
        .or_else(|| var_os("HOME").and_then(absolute).map(|h| h.join(".cache")))
        .map(|base| base.join("es2-wgpu"))
}

/// A device's pipeline cache and the file it came from and goes back to.
pub(crate) struct DiskPipelineCache {
    pub(crate) cache: wgpu::PipelineCache,
    path: PathBuf,
    /// Bytes of the data last read or written, to skip writing what is already there.
    stored: AtomicUsize,
}

impl DiskPipelineCache {
    /// The cache of `info`'s adapter in `dir`, started from its file when there is one; `None`
    /// where the device has no pipeline cache feature or wgpu none for the backend.
    pub(crate) fn open(
        device: &wgpu::Device,
        info: &wgpu::AdapterInfo,
        dir: &Path,
    ) -> Option<DiskPipelineCache> {
        if !device.features().contains(wgpu::Features::PIPELINE_CACHE) {
            return None;
        }
        let path = dir.join(wgpu::util::pipeline_cache_key(info)?);
        // A missing or unreadable file is an empty cache: it only costs compile time.
        let data = std::fs::read(&path).ok();
        // SAFETY: the data is what `get_data` returned for an adapter with the same
        // `pipeline_cache_key` (the file is named by it), and with `fallback` wgpu and the
        // driver validate its header and start empty on any mismatch or corruption.
        let cache = unsafe {
            device.create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
                label: Some("es2-wgpu pipelines"),
                data: data.as_deref(),
                fallback: true,
            })
        };
        Some(DiskPipelineCache {
            cache,
            stored: AtomicUsize::new(data.map_or(0, |d| d.len())),
            path,
        })
    }

    /// The cache file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the cache to its file when its data changed size since it was read or last
    /// written (pipelines only ever add to it). Returns whether it wrote.
    pub(crate) fn save(&self) -> Result<bool> {
        let Some(data) = self.cache.get_data() else {
            return Ok(false);
        };
        if data.len() == self.stored.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        // A temporary file of this writer's own: devices of other threads or processes may
        // save the same cache at once, and each renames a whole file over it.
        static WRITES: AtomicUsize = AtomicUsize::new(0);
        let n = WRITES.fetch_add(1, Ordering::Relaxed);
        let temp = self
            .path
            .with_extension(format!("partial.{}.{n}", std::process::id()));
        std::fs::write(&temp, &data).map_err(|e| Error::io(&temp, e))?;
        std::fs::rename(&temp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        self.stored.store(data.len(), Ordering::Relaxed);
        Ok(true)
    }
}

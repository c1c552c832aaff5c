//! Files written so that nothing on disk is ever half-written: everything goes to a temporary
//! file in the destination folder, is synced, then renamed over the destination.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, View};

use crate::gpu::{DType, Gpu, Tensor};
use crate::{Error, Result};

/// A hidden sibling of `path` to build it aside (its folder is created).
fn sibling(path: &Path, tag: &str) -> Result<PathBuf> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(dir.join(format!(".{name}.{tag}-{}", std::process::id())))
}

/// Writes `path` through `write`, atomically: readers see the old file or the whole new one.
pub fn atomic_write(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    let temp = sibling(path, "tmp")?;
    let result = (|| {
        let file = File::create(&temp)?;
        let mut writer = BufWriter::new(file);
        write(&mut writer)?;
        let file = writer.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        crate::failpoint::hit_path("write-file", path);
        std::fs::rename(&temp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&temp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Serialises `value` as pretty JSON into `path`, atomically.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::format(path, format!("cannot serialise: {e}")))?;
    atomic_write(path, |w| {
        w.write_all(text.as_bytes())?;
        w.write_all(b"\n")
    })
}

/// Where a tensor to be saved lives: already on the host (f32), or on the GPU as one tensor or
/// as consecutive row chunks (read back only when the writer reaches it, so one tensor at a
/// time is in host memory, and written in the element type it is stored in).
pub enum SaveTensor<'a> {
    /// f32 values already on the host.
    Host {
        /// The tensor's dimensions.
        shape: Vec<usize>,
        /// Its values, row-major.
        data: Vec<f32>,
    },
    /// One tensor on the GPU.
    Device {
        /// The device it lives on.
        gpu: &'a Gpu,
        /// The tensor, written in its own element type.
        tensor: Tensor,
    },
    /// One tensor stored as consecutive row chunks on the GPU (a vocabulary matrix).
    Chunks {
        /// The device they live on.
        gpu: &'a Gpu,
        /// The whole tensor's dimensions.
        shape: Vec<usize>,
        /// The chunks, in row order, sharing one element type.
        chunks: Vec<Tensor>,
    },
}

impl SaveTensor<'_> {
    /// The element type it is stored, and written, in.
    fn dtype(&self) -> DType {
        match self {
            SaveTensor::Host { .. } => DType::F32,
            SaveTensor::Device { tensor, .. } => tensor.dtype(),
            SaveTensor::Chunks { chunks, .. } => chunks.first().map_or(DType::F32, Tensor::dtype),
        }
    }
}

struct Pending<'a> {
    shape: Vec<usize>,
    dtype: DType,
    source: SaveTensor<'a>,
}

impl View for Pending<'_> {
    fn dtype(&self) -> Dtype {
        match self.dtype {
            DType::F32 => Dtype::F32,
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
            DType::U32 => Dtype::U32,
        }
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        match &self.source {
            SaveTensor::Host { data, .. } => Cow::Borrowed(bytemuck::cast_slice(data)),
            SaveTensor::Device { gpu, tensor } => Cow::Owned(read_back(gpu, tensor)),
            SaveTensor::Chunks { gpu, chunks, .. } => {
                Cow::Owned(chunks.iter().flat_map(|c| read_back(gpu, c)).collect())
            }
        }
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_bytes()
    }
}

/// The View trait cannot fail; a readback failing after a successful run is a lost device,
/// which wgpu reports on its own.
fn read_back(gpu: &Gpu, tensor: &Tensor) -> Vec<u8> {
    tensor
        .to_bytes(gpu)
        .unwrap_or_else(|e| panic!("reading {tensor:?} back for saving failed: {e}"))
}

/// Builds the folder `dir` through `fill` in a temporary sibling folder, then swaps it in:
/// an existing `dir` is replaced only once the new one is complete.
pub fn atomic_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let temp = sibling(dir, "tmp")?;
    let _ = std::fs::remove_dir_all(&temp);
    std::fs::create_dir_all(&temp).map_err(|e| Error::io(&temp, e))?;
    if let Err(e) = fill(&temp) {
        let _ = std::fs::remove_dir_all(&temp);
        return Err(e);
    }
    let old = sibling(dir, "old")?;
    let had_old = dir.exists();
    if had_old {
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
        // A kill here leaves no `dir`, only the old folder aside: `recover` moves it back.
        crate::failpoint::hit_path("swap-dir", dir);
    }
    std::fs::rename(&temp, dir).map_err(|e| Error::io(dir, e))?;
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

/// Writes tensors to a safetensors file, atomically, with optional string metadata. Each is
/// written in its own element type (host data is f32; the chunks of one tensor share theirs).
pub fn write_safetensors(
    path: &Path,
    tensors: Vec<(String, SaveTensor)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let pending: Vec<(String, Pending)> = tensors
        .into_iter()
        .map(|(name, source)| {
            let shape = match &source {
                SaveTensor::Host { shape, .. } => shape.clone(),
                SaveTensor::Device { tensor, .. } => tensor.dims().to_vec(),
                SaveTensor::Chunks { shape, .. } => shape.clone(),
            };
            let dtype = source.dtype();
            (
                name,
                Pending {
                    shape,
                    dtype,
                    source,
                },
            )
        })
        .collect();
    let temp = sibling(path, "tmp")?;
    let written = safetensors::serialize_to_file(pending, metadata, &temp)
        .map_err(|e| Error::format(path, format!("cannot write safetensors: {e:?}")))
        .and_then(|()| {
            File::open(&temp)
                .and_then(|f| f.sync_all())
                .and_then(|()| {
                    crate::failpoint::hit_path("write-safetensors", path);
                    std::fs::rename(&temp, path)
                })
                .map_err(|e| Error::io(path, e))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}

/// Cleans up after a process killed while writing into `dir` (see [`atomic_write`],
/// [`atomic_dir`]): removes the temporary siblings it was building (`.NAME.tmp-PID`), and
/// moves back a folder it had moved aside (`.NAME.old-PID`) when the new one never arrived.
/// Only for folders that one process writes at a time, such as a training run's output.
pub fn recover(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some((name, tag)) = leftover(&file_name) else {
            continue;
        };
        let original = dir.join(name);
        let result = if tag == "old" && !original.exists() {
            std::fs::rename(&path, &original)
        } else if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        result.map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// `(NAME, "tmp" | "old")` for a sibling named by [`sibling`]: `.NAME.TAG-PID`.
fn leftover(file_name: &str) -> Option<(&str, &str)> {
    let (name, tag) = file_name.strip_prefix('.')?.rsplit_once('.')?;
    let (tag, pid) = tag.split_once('-')?;
    let ok = matches!(tag, "tmp" | "old") && pid.parse::<u32>().is_ok() && !name.is_empty();
    ok.then_some((name, tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_files_and_cleans_up_on_failure() {
        let dir = std::env::temp_dir().join(format!("es2-io-{}", std::process::id()));
        let path = dir.join("a.json");
        write_json(&path, &serde_json::json!({"x": 1})).unwrap();
        let failed = atomic_write(&path, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(failed.unwrap_err().to_string().contains("disk full"));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("\"x\": 1"),
            "the old file survives a failed write: {text}"
        );
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn recover_removes_half_built_siblings_and_restores_a_folder_moved_aside() {
        let dir = std::env::temp_dir().join(format!("es2-io-recover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join(".merged.old-77")).unwrap();
        std::fs::write(dir.join(".merged.old-77/config.json"), "{}").unwrap();
        std::fs::create_dir_all(dir.join(".merged.tmp-77")).unwrap();
        std::fs::write(dir.join(".adapter_model.safetensors.tmp-78"), "half").unwrap();
        std::fs::create_dir_all(dir.join("model")).unwrap();
        std::fs::create_dir_all(dir.join(".model.old-79")).unwrap();
        std::fs::write(dir.join(".hidden.txt"), "not ours").unwrap();
        recover(&dir).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [".hidden.txt", "merged", "model"]);
        assert!(dir.join("merged/config.json").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Safetensors checkpoints: one `model.safetensors` or the shards listed in
//! `model.safetensors.index.json`, memory-mapped; each tensor is converted to f32 on its own
//! so that loading never holds a second full copy of the model in host memory.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorInfo};
use safetensors::{SafeTensorError, SafeTensors};
use serde_json::Value;

use crate::{Error, Result};

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// A shard's bytes: a memory-mapped file, or bytes built into the binary.
enum Bytes {
    Mapped(Mmap),
    Static(&'static [u8]),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(map) => map,
            Bytes::Static(bytes) => bytes,
        }
    }
}

struct Shard {
    /// The file, or what stands in for it in messages.
    path: PathBuf,
    map: Bytes,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

/// The tensors of a checkpoint folder, by name.
pub struct Checkpoint {
    shards: Vec<Shard>,
    /// Tensor name → index into `shards`.
    index: HashMap<String, usize>,
    /// Refuse tensors holding NaN or ±Inf instead of warning about them.
    strict: bool,
    /// Tensors already warned about (a tensor may be read in several row ranges).
    warned: std::sync::Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("shards", &self.shards.len())
            .field("tensors", &self.index.len())
            .finish()
    }
}

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or the shards named by `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let files = if index_path.exists() {
            shard_files(&index_path)?
        } else {
            let single = dir.join(SINGLE_FILE);
            if !single.exists() {
                return Err(Error::format(
                    dir,
                    format!("no weights: neither {SINGLE_FILE} nor {INDEX_FILE} is in the folder"),
                ));
            }
            vec![single]
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for path in files {
            let shard = open_shard(&path)?;
            for name in shard.tensors.keys() {
                if index.insert(name.clone(), shards.len()).is_some() {
                    return Err(Error::format(
                        &path,
                        format!("tensor {name} appears in two shards"),
                    ));
                }
            }
            shards.push(shard);
        }
        Ok(Checkpoint::new(shards, index))
    }

    fn new(shards: Vec<Shard>, index: HashMap<String, usize>) -> Self {
        Checkpoint {
            shards,
            index,
            strict: false,
            warned: Default::default(),
        }
    }

    /// With `strict`, reading a tensor that holds NaN or ±Inf is an error; without it (the
    /// default) such a tensor loads and a warning naming it goes to stderr once.
    pub fn strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// Opens one safetensors file (an adapter, a fixture).
    pub fn open_file(path: &Path) -> Result<Self> {
        open_shard(path).map(Checkpoint::single)
    }

    /// A safetensors file built into the binary; `origin` names it in messages.
    pub fn from_static(origin: &str, bytes: &'static [u8]) -> Result<Self> {
        read_shard(Path::new(origin), Bytes::Static(bytes)).map(Checkpoint::single)
    }

    fn single(shard: Shard) -> Self {
        let index = shard.tensors.keys().map(|name| (name.clone(), 0)).collect();
        Checkpoint::new(vec![shard], index)
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.index.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Whether any shard holds tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn entry(&self, name: &str) -> Result<(&Shard, &TensorInfo)> {
        let shard = self
            .index
            .get(name)
            .map(|&i| &self.shards[i])
            .ok_or_else(|| {
                let where_ = self
                    .shards
                    .first()
                    .map(|s| s.path.clone())
                    .unwrap_or_default();
                Error::format(
                    where_,
                    format!("tensor {name} is missing from the checkpoint"),
                )
            })?;
        Ok((shard, &shard.tensors[name]))
    }

    /// Shape of tensor `name`.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        Ok(&self.entry(name)?.1.shape)
    }

    /// Tensor `name` as f32, after checking that its shape is `expected`.
    pub fn load_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let rows = expected.first().copied().unwrap_or(1);
        self.load_f32_rows(name, expected, 0..rows)
    }

    /// Rows `rows` (of the outermost dimension) of tensor `name` as f32, after checking that
    /// the whole tensor has shape `expected`. Used to split a large embedding or LM head.
    pub fn load_f32_rows(
        &self,
        name: &str,
        expected: &[usize],
        rows: Range<usize>,
    ) -> Result<Vec<f32>> {
        let (shard, info) = self.entry(name)?;
        if info.shape != expected {
            return Err(Error::format(
                &shard.path,
                format!(
                    "tensor {name} has shape {:?}, expected {expected:?}",
                    info.shape
                ),
            ));
        }
        let width = element_size(info.dtype).ok_or_else(|| {
            Error::format(
                &shard.path,
                format!(
                    "tensor {name} has dtype {:?}; expected F32, F16 or BF16",
                    info.dtype
                ),
            )
        })?;
        let outer = expected.first().copied().unwrap_or(1);
        assert!(rows.end <= outer, "row range past the tensor");
        let row_bytes = expected.iter().skip(1).product::<usize>() * width;
        let (start, _) = info.data_offsets;
        let begin = shard.data_start + start + rows.start * row_bytes;
        let bytes = &shard.map[begin..begin + rows.len() * row_bytes];
        let data = to_f32(info.dtype, bytes);
        self.check_finite(&shard.path, name, &data)?;
        Ok(data)
    }

    /// NaN or ±Inf in a weight poisons every output it reaches: an error when strict, else
    /// a warning (some checkpoints carry them in rows that are never used, e.g. padding
    /// tokens' embeddings).
    fn check_finite(&self, path: &Path, name: &str, data: &[f32]) -> Result<()> {
        let Some(first) = data.iter().position(|x| !x.is_finite()) else {
            return Ok(());
        };
        let count = data.iter().filter(|x| !x.is_finite()).count();
        let what = format!(
            "tensor {name} holds {count} non-finite value{} (the first, at element {first}, is {})",
            if count == 1 { "" } else { "s" },
            data[first]
        );
        if self.strict {
            return Err(Error::format(
                path,
                format!("{what}; refusing it (without --strict it loads with a warning)"),
            ));
        }
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        if warned.insert(name.to_owned()) {
            eprintln!(
                "warning: {}: {what}; outputs it reaches will be NaN (--strict refuses such \
                 weights)",
                path.display()
            );
        }
        Ok(())
    }
}

fn element_size(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F32 => Some(4),
        Dtype::F16 | Dtype::BF16 => Some(2),
        _ => None,
    }
}

fn to_f32(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => unreachable!("element_size admits only float dtypes"),
    }
}

fn shard_files(index_path: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(index_path, format!("not valid JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::format(index_path, "no weight_map object"))?;
    let dir = index_path.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::format(
                index_path,
                format!("weight_map[{tensor}] is not a file name"),
            )
        })?;
        let path = dir.join(file);
        if !files.contains(&path) {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(Error::format(index_path, "weight_map lists no files"));
    }
    files.sort();
    Ok(files)
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only; as with every memory-mapped loader, the file must not be
    // truncated by another process while the checkpoint is open.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    read_shard(path, Bytes::Mapped(map))
}

fn read_shard(path: &Path, map: Bytes) -> Result<Shard> {
    let (header_len, metadata) = SafeTensors::read_metadata(&map)
        .map_err(|e| Error::format(path, header_problem(&map, &e)))?;
    // safetensors keeps the last of two entries with one name when their offsets still tile.
    let entries = header_entries(&map[8..8 + header_len]).unwrap_or_default();
    if let Some(name) = duplicate_name(&entries) {
        return Err(Error::format(
            path,
            format!("tensor {name} is listed twice in the header"),
        ));
    }
    let tensors = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| (name, info.clone()))
        .collect();
    Ok(Shard {
        path: path.to_owned(),
        map,
        data_start: 8 + header_len,
        tensors,
    })
}

/// The largest header safetensors accepts.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Explains why safetensors rejected a file, naming the tensor to blame where one is.
fn header_problem(bytes: &[u8], err: &SafeTensorError) -> String {
    let claimed = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    let blamed = match (err, claimed) {
        (SafeTensorError::HeaderTooSmall, _) => Some(format!(
            "the file is {} bytes long, too short to be a safetensors file",
            bytes.len()
        )),
        (SafeTensorError::HeaderTooLarge, Some(n)) => Some(format!(
            "the header claims to be {n} bytes long, more than the {MAX_HEADER_BYTES} \
             safetensors allows: not a safetensors file, or a corrupt one"
        )),
        (SafeTensorError::InvalidHeaderLength, Some(n)) => Some(format!(
            "the header claims to be {n} bytes long, but the file holds only {} bytes: \
             truncated or corrupt",
            bytes.len()
        )),
        _ => blame_tensor(bytes),
    };
    blamed.unwrap_or_else(|| format!("not a valid safetensors file (truncated or corrupt?): {err}"))
}

/// The header's entries in file order, duplicates kept (a JSON object read into a map would
/// silently keep only the last of two entries with one name).
fn header_entries(header: &[u8]) -> Option<Vec<(String, Value)>> {
    struct Entries(Vec<(String, Value)>);
    impl<'de> serde::Deserialize<'de> for Entries {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
            struct Visit;
            impl<'de> serde::de::Visitor<'de> for Visit {
                type Value = Entries;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> std::result::Result<Entries, A::Error> {
                    let mut entries = Vec::new();
                    while let Some(entry) = map.next_entry()? {
                        entries.push(entry);
                    }
                    Ok(Entries(entries))
                }
            }
            d.deserialize_map(Visit)
        }
    }
    serde_json::from_slice::<Entries>(header).ok().map(|e| e.0)
}

/// A name listed twice in the header.
fn duplicate_name(entries: &[(String, Value)]) -> Option<&str> {
    let mut seen = HashSet::new();
    entries
        .iter()
        .map(|(name, _)| name.as_str())
        .find(|name| !seen.insert(*name))
}

/// What is wrong with the tensor table: a name listed twice, tensors that overlap or leave
/// a gap, a byte range that disagrees with its shape and dtype or runs past the end of the
/// file, or stray bytes after the last tensor.
fn blame_tensor(bytes: &[u8]) -> Option<String> {
    let header_len = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header_end = header_len.checked_add(8)?;
    let entries = header_entries(bytes.get(8..header_end)?)?;
    if let Some(name) = duplicate_name(&entries) {
        return Some(format!("tensor {name} is listed twice in the header"));
    }
    let data_len = bytes.len() - header_end;
    let mut tensors: Vec<(&String, TensorInfo)> = entries
        .iter()
        .filter(|(name, _)| name != "__metadata__")
        .filter_map(|(name, v)| Some((name, serde_json::from_value(v.clone()).ok()?)))
        .collect();
    tensors.sort_by_key(|(_, info)| info.data_offsets);
    let mut previous: Option<(&String, (usize, usize))> = None;
    for (name, info) in &tensors {
        let (start, end) = info.data_offsets;
        let needed = info
            .shape
            .iter()
            .try_fold(info.dtype.bitsize(), |n, &d| n.checked_mul(d))
            .map(|bits| bits / 8);
        if end.checked_sub(start) != needed {
            return Some(format!(
                "tensor {name}: data_offsets [{start}, {end}] do not hold shape {:?} of {:?}",
                info.shape, info.dtype
            ));
        }
        let (before, before_end) = previous.map_or((None, 0), |(n, (_, e))| (Some(n), e));
        if start < before_end {
            let before = before.expect("a tensor ends after 0 only if there is one");
            return Some(format!(
                "tensors {before} and {name} overlap: {name} starts at byte {start} of the \
                 data, before {before} ends at {before_end}"
            ));
        }
        if start > before_end {
            let after = before.map_or("the start of the data".to_owned(), |n| n.to_string());
            return Some(format!(
                "bytes {before_end}..{start} of the data, between {after} and {name}, belong \
                 to no tensor"
            ));
        }
        if end > data_len {
            return Some(format!(
                "truncated or lying header: tensor {name} ends at byte {end} of the data, \
                 but the file holds {data_len} bytes of data"
            ));
        }
        previous = Some((name, info.data_offsets));
    }
    let used = tensors.last().map_or(0, |(_, info)| info.data_offsets.1);
    (used < data_len).then(|| {
        format!(
            "{} bytes after the last tensor's data: the header does not describe the file",
            data_len - used
        )
    })
}

//! `Tensor`: a storage buffer (or a window of one) with a shape and an element type.

use std::fmt;
use std::sync::Arc;

use super::pool::{PooledBuffer, TENSOR_USAGE};
use super::Gpu;
use crate::{Error, Result};

/// Element type of a tensor in GPU memory (serialized by its name: `"f32"`, `"bf16"`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE single precision: every activation, gradient and trainable weight.
    F32,
    /// IEEE half precision (frozen weights stored in f16: `LoadOptions::weights`).
    F16,
    /// bfloat16, stored as raw 16-bit patterns (WGSL has no bf16; kernels widen it exactly:
    /// frozen weights stored in bf16, `LoadOptions::weights`).
    BF16,
    /// Unsigned 32-bit integers (token ids, lengths, masks).
    U32,
}

impl DType {
    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::U32 => "u32",
        };
        f.write_str(name)
    }
}

/// The dimensions of a tensor, outermost first (row-major).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Shape(Vec<usize>);

impl Shape {
    /// A shape from its dimensions, outermost first.
    pub fn new(dims: impl Into<Vec<usize>>) -> Self {
        Shape(dims.into())
    }

    /// The dimensions, outermost first.
    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// Number of elements (the product of the dimensions).
    pub fn numel(&self) -> usize {
        self.0.iter().product()
    }

    /// The innermost dimension (1 for a scalar).
    pub fn last(&self) -> usize {
        self.0.last().copied().unwrap_or(1)
    }

    /// Everything but the innermost dimension, multiplied out: the number of rows.
    pub fn rows(&self) -> usize {
        self.numel() / self.last().max(1)
    }

    /// Dimension `i` counted from the end (0 is the innermost); 1 past the rank.
    pub fn dim_from_end(&self, i: usize) -> usize {
        if i < self.0.len() {
            self.0[self.0.len() - 1 - i]
        } else {
            1
        }
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl<const N: usize> From<[usize; N]> for Shape {
    fn from(dims: [usize; N]) -> Self {
        Shape(dims.to_vec())
    }
}

impl From<&[usize]> for Shape {
    fn from(dims: &[usize]) -> Self {
        Shape(dims.to_vec())
    }
}

impl From<Vec<usize>> for Shape {
    fn from(dims: Vec<usize>) -> Self {
        Shape(dims)
    }
}

/// Rows of a chunked tensor keep their byte offsets aligned for any width when a part starts
/// at a multiple of this many rows.
const PART_ROW_ALIGN: usize = 64;

/// The most rows (a multiple of 64, at least 64, at most `rows`) of a `[rows, cols]` f32 matrix
/// that fit one binding of `max_binding` bytes: how vocabulary-sized matrices and the tensors
/// that follow their rows are split into parts.
pub fn rows_per_binding(rows: usize, cols: usize, max_binding: u64) -> usize {
    let fit = (max_binding / (cols.max(1) as u64 * 4)) as usize;
    let aligned = (fit / PART_ROW_ALIGN * PART_ROW_ALIGN).max(PART_ROW_ALIGN);
    aligned.min(rows.max(1))
}

/// A tensor in GPU memory. Cloning shares the storage. Dropping the last handle returns the
/// buffer to the device's pool.
#[derive(Clone)]
pub struct Tensor {
    pub(crate) storage: Arc<PooledBuffer>,
    offset: u64,
    shape: Shape,
    dtype: DType,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor({}, {})", self.shape, self.dtype)
    }
}

impl Tensor {
    /// A tensor with unspecified contents (possibly a reused buffer): every kernel that
    /// writes it must cover every element.
    pub fn empty(gpu: &Gpu, shape: impl Into<Shape>, dtype: DType) -> Tensor {
        let shape = shape.into();
        let bytes = (shape.numel() * dtype.size_bytes()) as u64;
        let storage = gpu.pool.take(&gpu.device, bytes, TENSOR_USAGE);
        Tensor {
            storage: Arc::new(storage),
            offset: 0,
            shape,
            dtype,
        }
    }

    /// A tensor filled with zeros.
    pub fn zeros(gpu: &Gpu, shape: impl Into<Shape>, dtype: DType) -> Tensor {
        let t = Tensor::empty(gpu, shape, dtype);
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        encoder.clear_buffer(t.buffer(), t.offset, Some(t.padded_size()));
        gpu.queue.submit([encoder.finish()]);
        t
    }

    /// Uploads `data` (f32).
    pub fn from_f32(gpu: &Gpu, shape: impl Into<Shape>, data: &[f32]) -> Result<Tensor> {
        Self::from_pod(gpu, shape.into(), DType::F32, data)
    }

    /// Uploads `data` (u32: token ids, lengths, indices).
    pub fn from_u32(gpu: &Gpu, shape: impl Into<Shape>, data: &[u32]) -> Result<Tensor> {
        Self::from_pod(gpu, shape.into(), DType::U32, data)
    }

    /// Uploads `data` (f16).
    pub fn from_f16(gpu: &Gpu, shape: impl Into<Shape>, data: &[half::f16]) -> Result<Tensor> {
        Self::from_pod(gpu, shape.into(), DType::F16, data)
    }

    /// Uploads `data` (bf16 bit patterns).
    pub fn from_bf16(gpu: &Gpu, shape: impl Into<Shape>, data: &[half::bf16]) -> Result<Tensor> {
        Self::from_pod(gpu, shape.into(), DType::BF16, data)
    }

    /// Uploads raw little-endian bytes of `dtype` elements.
    pub fn from_bytes(
        gpu: &Gpu,
        shape: impl Into<Shape>,
        dtype: DType,
        bytes: &[u8],
    ) -> Result<Tensor> {
        let shape = shape.into();
        let expected = shape.numel() * dtype.size_bytes();
        if bytes.len() != expected {
            return Err(Error::InvalidArgument(format!(
                "tensor of shape {shape} and dtype {dtype} needs {expected} bytes, got {}",
                bytes.len()
            )));
        }
        let t = Tensor::empty(gpu, shape, dtype);
        t.write_bytes(gpu, bytes);
        Ok(t)
    }

    fn from_pod<T: bytemuck::Pod>(
        gpu: &Gpu,
        shape: Shape,
        dtype: DType,
        data: &[T],
    ) -> Result<Tensor> {
        Self::from_bytes(gpu, shape, dtype, bytemuck::cast_slice(data))
    }

    /// Overwrites the contents with `data` (f32). Lengths must match.
    pub fn write_f32(&self, gpu: &Gpu, data: &[f32]) -> Result<()> {
        if self.dtype != DType::F32 || data.len() != self.numel() {
            return Err(Error::InvalidArgument(format!(
                "cannot write {} f32 values into {self:?}",
                data.len()
            )));
        }
        self.write_bytes(gpu, bytemuck::cast_slice(data));
        Ok(())
    }

    /// Overwrites the contents with `data` (u32). Lengths must match.
    pub fn write_u32(&self, gpu: &Gpu, data: &[u32]) -> Result<()> {
        if self.dtype != DType::U32 || data.len() != self.numel() {
            return Err(Error::InvalidArgument(format!(
                "cannot write {} u32 values into {self:?}",
                data.len()
            )));
        }
        self.write_bytes(gpu, bytemuck::cast_slice(data));
        Ok(())
    }

    fn write_bytes(&self, gpu: &Gpu, bytes: &[u8]) {
        // write_buffer needs a multiple of 4 bytes; odd-length f16 tensors get one pad element.
        if bytes.len() % 4 == 0 {
            gpu.queue.write_buffer(self.buffer(), self.offset, bytes);
        } else {
            let mut padded = bytes.to_vec();
            padded.resize(bytes.len().next_multiple_of(4), 0);
            gpu.queue.write_buffer(self.buffer(), self.offset, &padded);
        }
    }

    /// Fills every element with `value` (f32 tensors).
    pub fn fill_f32(&self, gpu: &Gpu, value: f32) -> Result<()> {
        self.write_f32(gpu, &vec![value; self.numel()])
    }

    /// Its shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// Its dimensions, outermost first.
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    /// Its element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.numel()
    }

    /// Size of the elements in bytes.
    pub fn size_bytes(&self) -> u64 {
        (self.numel() * self.dtype.size_bytes()) as u64
    }

    /// Size rounded up to the 4-byte granularity of bindings and copies.
    pub(crate) fn padded_size(&self) -> u64 {
        self.size_bytes().max(4).next_multiple_of(4)
    }

    /// The wgpu buffer it lives in (a view starts at [`Tensor::offset_bytes`]).
    pub fn buffer(&self) -> &wgpu::Buffer {
        self.storage.raw()
    }

    /// Byte offset of the first element inside [`Tensor::buffer`].
    pub fn offset_bytes(&self) -> u64 {
        self.offset
    }

    /// The same storage under another shape with as many elements.
    pub fn reshape(&self, shape: impl Into<Shape>) -> Tensor {
        let shape = shape.into();
        assert_eq!(
            shape.numel(),
            self.numel(),
            "reshape {} -> {shape} changes the element count",
            self.shape
        );
        Tensor {
            shape,
            ..self.clone()
        }
    }

    /// Rows `start..start + count` of the outermost dimension, sharing storage. The byte offset
    /// must meet the device's storage-offset alignment so the view can be bound.
    pub fn rows_view(&self, gpu: &Gpu, start: usize, count: usize) -> Tensor {
        let outer = self.dims().first().copied().unwrap_or(1);
        assert!(
            start + count <= outer,
            "rows {start}..{} out of range for {self:?}",
            start + count
        );
        let row_elems = self.numel() / outer.max(1);
        let offset = self.offset + (start * row_elems * self.dtype.size_bytes()) as u64;
        let align = u64::from(gpu.limits().min_storage_buffer_offset_alignment);
        assert!(
            offset % align == 0,
            "row view at byte {offset} is not aligned to {align}"
        );
        let mut dims = self.dims().to_vec();
        if let Some(first) = dims.first_mut() {
            *first = count;
        }
        Tensor {
            storage: self.storage.clone(),
            offset,
            shape: Shape::new(dims),
            dtype: self.dtype,
        }
    }

    /// Copies the contents back to the host as raw bytes (blocking).
    pub fn to_bytes(&self, gpu: &Gpu) -> Result<Vec<u8>> {
        let size = self.padded_size();
        let mut bytes = gpu.read_back("tensor readback", size, |encoder, staging| {
            encoder.copy_buffer_to_buffer(self.buffer(), self.offset, staging, 0, size);
        })?;
        bytes.truncate(self.size_bytes() as usize);
        Ok(bytes)
    }

    /// Copies an f32 tensor back to the host (blocking).
    pub fn to_f32(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        self.expect_dtype(DType::F32)?;
        Ok(bytemuck::pod_collect_to_vec(&self.to_bytes(gpu)?))
    }

    /// Copies a u32 tensor back to the host (blocking).
    pub fn to_u32(&self, gpu: &Gpu) -> Result<Vec<u32>> {
        self.expect_dtype(DType::U32)?;
        Ok(bytemuck::pod_collect_to_vec(&self.to_bytes(gpu)?))
    }

    fn expect_dtype(&self, dtype: DType) -> Result<()> {
        if self.dtype == dtype {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "{self:?} read back as {dtype}"
            )))
        }
    }

    /// The binding this tensor occupies in a bind group.
    pub(crate) fn binding(&self) -> wgpu::BufferBinding<'_> {
        wgpu::BufferBinding {
            buffer: self.buffer(),
            offset: self.offset,
            size: std::num::NonZeroU64::new(self.padded_size()),
        }
    }
}

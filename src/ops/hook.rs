//! Hooks on the residual stream: in-place edits of selected rows of hidden states `x [rows, C]`
//! (add a vector, replace by one, project out of a direction or clamp along it), the kernels
//! behind the block-loop runner's hooks and their backward.

use super::common::{expect_dims, expect_dtype, launch_per_item, launch_rows};
use crate::gpu::{read, read_write, DType, KernelSpec, Recorder, Shader, Tensor};
use crate::shader;

static SHADER: Shader = shader!("hook");

static ADD: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "hook_add",
    bindings: &[read(1), read(2), read_write(3)],
};
static REPLACE: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "hook_replace",
    bindings: &[read(1), read(2), read_write(3)],
};
static PROJECT: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "hook_project",
    bindings: &[read(1), read(2), read_write(3)],
};

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    selected: u32,
    cols: u32,
    value_rows: u32,
    scale: f32,
    bias: f32,
    threshold: f32,
    clamped: u32,
}

/// Which rows of `x [rows, C]` a hook edits: `rows [n]` (u32 row indices, distinct: each row
/// has one writer), with the value tensor `[value_rows, C]` whose row `i % value_rows` goes
/// with the i-th selected row.
#[derive(Debug, Clone, Copy)]
pub struct RowEdit<'a> {
    /// The hidden states `[rows, C]` (f32), edited in place.
    pub x: &'a Tensor,
    /// The indices of the rows to edit (u32, `[n]`, each below `rows` and none repeated).
    pub rows: &'a Tensor,
    /// The values `[value_rows, C]` (f32, at least one row), reused cyclically over `rows`.
    pub value: &'a Tensor,
}

impl RowEdit<'_> {
    fn params(&self, op: &str) -> Params {
        let &[_, cols] = self.x.dims() else {
            panic!("{op}: hidden states must be [rows, C], got {:?}", self.x);
        };
        expect_dtype(op, "hidden states", self.x, DType::F32);
        expect_dtype(op, "rows", self.rows, DType::U32);
        let value_rows = self.value.numel() / cols.max(1);
        expect_dims(op, "value", self.value, DType::F32, &[value_rows, cols]);
        assert!(value_rows >= 1, "{op}: the value needs at least one row");
        Params {
            selected: self.rows.numel() as u32,
            cols: cols as u32,
            value_rows: value_rows as u32,
            ..Params::default()
        }
    }

    fn tensors(&self) -> [&Tensor; 3] {
        [self.rows, self.value, self.x]
    }
}

/// `x[rows[i]] += scale · value[i % value_rows]`.
pub fn hook_add(rec: &mut Recorder, edit: &RowEdit, scale: f32) {
    let params = Params {
        scale,
        ..edit.params("hook_add")
    };
    let items = (params.selected * params.cols) as usize;
    launch_per_item(rec, &ADD, &edit.tensors(), &params, items);
}

/// `x[rows[i]] = value[i % value_rows]`.
pub fn hook_replace(rec: &mut Recorder, edit: &RowEdit) {
    let params = edit.params("hook_replace");
    let items = (params.selected * params.cols) as usize;
    launch_per_item(rec, &REPLACE, &edit.tensors(), &params, items);
}

/// How [`hook_project`] moves a row along the direction `w`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ProjectMode {
    /// `x −= (x·w + bias)·w/(w·w)`: with bias 0 the row loses its component along `w`.
    Exact {
        /// Added to `x·w`; the edited row ends with `x·w + bias = 0`.
        bias: f32,
    },
    /// `x −= max(x·w + bias − threshold, 0)·w/(w·w)`: a row with `x·w + bias` above the
    /// threshold moves onto it (a probe's logit clamped at σ⁻¹(P0)); others stay.
    ClampAbove {
        /// Added to `x·w` to give the value that is clamped (a probe's bias).
        bias: f32,
        /// The largest `x·w + bias` a row keeps.
        threshold: f32,
    },
}

/// Projects every selected row of `x` along `edit.value`'s first row `w` (`[1, C]`). A zero
/// `w` leaves the rows unchanged.
pub fn hook_project(rec: &mut Recorder, edit: &RowEdit, mode: ProjectMode) {
    let base = edit.params("hook_project");
    assert_eq!(base.value_rows, 1, "hook_project: w must be one row [1, C]");
    let params = match mode {
        ProjectMode::Exact { bias } => Params { bias, ..base },
        ProjectMode::ClampAbove { bias, threshold } => Params {
            bias,
            threshold,
            clamped: 1,
            ..base
        },
    };
    let shape = [params.selected as usize, params.cols as usize];
    launch_rows(rec, &PROJECT, &edit.tensors(), &params, shape);
}

/// CPU f64 references (`x` row-major `[rows, C]`, edited in place).
pub mod reference {
    use super::ProjectMode;

    fn value_row(value: &[f64], cols: usize, i: usize) -> &[f64] {
        let value_rows = value.len() / cols;
        &value[(i % value_rows) * cols..][..cols]
    }

    /// `x[rows[i]] += scale · value[i % value_rows]`.
    pub fn hook_add(x: &mut [f64], cols: usize, rows: &[u32], value: &[f64], scale: f64) {
        for (i, &r) in rows.iter().enumerate() {
            let v = value_row(value, cols, i);
            for (xc, vc) in x[r as usize * cols..][..cols].iter_mut().zip(v) {
                *xc += scale * vc;
            }
        }
    }

    /// `x[rows[i]] = value[i % value_rows]`.
    pub fn hook_replace(x: &mut [f64], cols: usize, rows: &[u32], value: &[f64]) {
        for (i, &r) in rows.iter().enumerate() {
            x[r as usize * cols..][..cols].copy_from_slice(value_row(value, cols, i));
        }
    }

    /// Moves every row in `rows` along `w [C]` as `p` says; a zero `w` changes nothing.
    pub fn hook_project(x: &mut [f64], cols: usize, rows: &[u32], w: &[f64], p: ProjectMode) {
        let norm_sq: f64 = w.iter().map(|v| v * v).sum();
        for &r in rows {
            let row = &mut x[r as usize * cols..][..cols];
            let dot: f64 = row.iter().zip(w).map(|(a, b)| a * b).sum();
            let amount = match p {
                ProjectMode::Exact { bias } => dot + f64::from(bias),
                ProjectMode::ClampAbove { bias, threshold } => {
                    (dot + f64::from(bias) - f64::from(threshold)).max(0.0)
                }
            };
            if norm_sq > 0.0 {
                for (xc, wc) in row.iter_mut().zip(w) {
                    *xc -= amount / norm_sq * wc;
                }
            }
        }
    }
}

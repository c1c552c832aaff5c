use es2_wgpu::gpu::DType;
use es2_wgpu::ops::embedding::{self, reference, EmbeddingGradIndex};
use es2_wgpu::rng::Rng;
use es2_wgpu::testing::*;
use es2_wgpu::{Recorder, Tensor};

const TOL: f64 = 1e-5;

/// `tokens` ids below `vocab`, never equal to `missing` (so that one row gets no gradient).
fn token_ids(seed: u64, tokens: usize, vocab: usize, missing: Option<u32>) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    let mut ids = Vec::with_capacity(tokens);
    while ids.len() < tokens {
        let id = rng.below(vocab) as u32;
        if Some(id) != missing {
            ids.push(id);
        }
    }
    ids
}

fn ids_tensor(ids: &[u32]) -> Tensor {
    Tensor::from_u32(gpu(), [ids.len()], ids).unwrap()
}

/// Rows `[first, first + rows)` of a row-major `[_, cols]` table, as their own tensor.
fn chunk(table: &[f32], cols: usize, first: usize, rows: usize) -> Tensor {
    upload(
        gpu(),
        [rows, cols],
        &table[first * cols..(first + rows) * cols],
    )
}

/// The forward over the table split at `splits` (chunk boundaries), one launch per chunk.
fn forward_in_chunks(ids: &[u32], table: &[f32], cols: usize, splits: &[usize]) -> Vec<f32> {
    let gpu = gpu();
    let out = poisoned(gpu, [ids.len(), cols]);
    let tids = ids_tensor(ids);
    let mut rec = Recorder::new(gpu);
    for bounds in splits.windows(2) {
        let tchunk = chunk(table, cols, bounds[0], bounds[1] - bounds[0]);
        embedding::embedding_forward(&mut rec, &tids, &tchunk, bounds[0], &out);
    }
    rec.finish().unwrap();
    download(gpu, &out)
}

/// The backward into `dtable0` (accumulated) over the table split at `splits`.
fn backward_in_chunks(
    ids: &[u32],
    dout: &[f32],
    dtable0: &[f32],
    cols: usize,
    splits: &[usize],
) -> Vec<f32> {
    let gpu = gpu();
    let index = EmbeddingGradIndex::new(gpu, ids).unwrap();
    let tdout = upload(gpu, [ids.len(), cols], dout);
    let chunks: Vec<Tensor> = splits
        .windows(2)
        .map(|b| chunk(dtable0, cols, b[0], b[1] - b[0]))
        .collect();
    let mut rec = Recorder::new(gpu);
    for (tchunk, bounds) in chunks.iter().zip(splits.windows(2)) {
        embedding::embedding_backward(&mut rec, &index, &tdout, tchunk, bounds[0]);
    }
    rec.finish().unwrap();
    chunks.iter().flat_map(|t| download(gpu, t)).collect()
}

#[test]
fn embedding_forward_matches_reference_with_one_or_two_chunks() {
    // (tokens, vocab, cols): repeated ids over odd sizes; V = 1 with C = 1.
    for (seed, tokens, vocab, cols) in [(1u64, 101usize, 23usize, 37usize), (2, 5, 1, 1)] {
        let ids = token_ids(seed, tokens, vocab, None);
        let table = randn(seed + 10, vocab * cols, 1.0);
        let mut want = vec![0.0; tokens * cols];
        reference::embedding_forward(&ids, &f64s(&table), cols, &mut want);

        let whole = forward_in_chunks(&ids, &table, cols, &[0, vocab]);
        let name = format!("embedding_forward T={tokens} V={vocab} C={cols}");
        assert_close(&name, &whole, &want, TOL);
        if vocab > 1 {
            let split = forward_in_chunks(&ids, &table, cols, &[0, vocab / 3, vocab]);
            assert_eq!(
                bits(&split),
                bits(&whole),
                "{name}: two chunks differ from one"
            );
        }
    }
}

/// A frozen f16 or bf16 table: the lookup widens it exactly, so it writes the f32 values of
/// the same numbers (f16's subnormals included), bit for bit what an f32 table holding them
/// writes, and splitting the table changes nothing. Odd widths put rows at odd element
/// offsets, in the high half of a 32-bit word.
#[test]
fn embedding_forward_of_a_16_bit_table_matches_the_reference_exactly() {
    let gpu = gpu();
    for dtype in [DType::F16, DType::BF16] {
        for (seed, tokens, vocab, cols) in [(20u64, 67usize, 29usize, 13usize), (21, 3, 1, 1)] {
            let ids = token_ids(seed, tokens, vocab, None);
            let table = narrow_weights(dtype, seed + 1, vocab * cols);
            let mut want = vec![0.0; tokens * cols];
            reference::embedding_forward(&ids, &f64s(&table), cols, &mut want);
            let name = format!("{dtype} embedding_forward T={tokens} V={vocab} C={cols}");
            let splits: &[usize] = if vocab > 1 {
                &[0, 7, vocab]
            } else {
                &[0, vocab]
            };
            let out = poisoned(gpu, [tokens, cols]);
            let tids = ids_tensor(&ids);
            let mut rec = Recorder::new(gpu);
            for b in splits.windows(2) {
                let rows = &table[b[0] * cols..b[1] * cols];
                let chunk = upload_as(gpu, [b[1] - b[0], cols], dtype, rows);
                embedding::embedding_forward(&mut rec, &tids, &chunk, b[0], &out);
            }
            rec.finish().unwrap();
            let got = download(gpu, &out);
            assert_close(&name, &got, &want, 0.0);
            let f32_path = forward_in_chunks(&ids, &table, cols, splits);
            assert_eq!(
                bits(&got),
                bits(&f32_path),
                "{name}: differs from the f32 table"
            );
        }
    }
}

#[test]
fn embedding_skips_ids_outside_the_table() {
    let gpu = gpu();
    let (vocab, cols) = (10, 7);
    let ids = [3u32, 10, 0, u32::MAX, 9, 3];
    let table = randn(3, vocab * cols, 1.0);
    let init = randn(4, ids.len() * cols, 1.0);
    let out = upload(gpu, [ids.len(), cols], &init);
    let mut rec = Recorder::new(gpu);
    let (tids, ttable) = (ids_tensor(&ids), chunk(&table, cols, 0, vocab));
    embedding::embedding_forward(&mut rec, &tids, &ttable, 0, &out);
    rec.finish().unwrap();
    let got = download(gpu, &out);
    for (t, &id) in ids.iter().enumerate() {
        let row = &got[t * cols..(t + 1) * cols];
        let want = match id as usize {
            id if id < vocab => &table[id * cols..(id + 1) * cols],
            _ => &init[t * cols..(t + 1) * cols],
        };
        assert_eq!(bits(row), bits(want), "forward row {t} (id {id})");
    }

    // The backward drops their gradient and writes nothing outside the table.
    let dout = randn(5, ids.len() * cols, 1.0);
    let dtable0 = randn(6, vocab * cols, 1.0);
    let mut want = f64s(&dtable0);
    reference::embedding_backward(&ids, &f64s(&dout), cols, &mut want);
    let got = backward_in_chunks(&ids, &dout, &dtable0, cols, &[0, vocab]);
    assert_close("embedding_backward ids >= V", &got, &want, TOL);
}

#[test]
fn embedding_backward_matches_reference_with_one_or_two_chunks() {
    // Repeated ids, and row 7 never occurs; V = 1 with C = 1.
    for (seed, tokens, vocab, cols) in [(5u64, 101usize, 23usize, 37usize), (6, 5, 1, 1)] {
        let missing = (vocab > 7).then_some(7u32);
        let ids = token_ids(seed, tokens, vocab, missing);
        let dout = randn(seed + 10, tokens * cols, 1.0);
        let dtable0 = randn(seed + 20, vocab * cols, 1.0);
        let mut want = f64s(&dtable0);
        reference::embedding_backward(&ids, &f64s(&dout), cols, &mut want);

        let whole = backward_in_chunks(&ids, &dout, &dtable0, cols, &[0, vocab]);
        let name = format!("embedding_backward T={tokens} V={vocab} C={cols}");
        assert_close(&name, &whole, &want, TOL);
        if let Some(row) = missing.map(|m| m as usize * cols) {
            assert_eq!(
                bits(&whole[row..row + cols]),
                bits(&dtable0[row..row + cols])
            );
        }
        if vocab > 1 {
            let split = backward_in_chunks(&ids, &dout, &dtable0, cols, &[0, vocab / 3, vocab]);
            assert_eq!(
                bits(&split),
                bits(&whole),
                "{name}: two chunks differ from one"
            );
            let again = backward_in_chunks(&ids, &dout, &dtable0, cols, &[0, vocab]);
            assert_eq!(bits(&again), bits(&whole), "{name}: reruns differ");
        }
    }
}

#[test]
fn embedding_reference_backward_matches_finite_differences() {
    let (vocab, cols) = (5, 3);
    let ids = [4u32, 1, 4, 0, 4, 1];
    let table = f64s(&randn(7, vocab * cols, 1.0));
    let dy = f64s(&randn(8, ids.len() * cols, 1.0));
    let mut analytic = vec![0.0; vocab * cols];
    reference::embedding_backward(&ids, &dy, cols, &mut analytic);
    let loss = |t: &[f64]| {
        let mut out = vec![0.0; ids.len() * cols];
        reference::embedding_forward(&ids, t, cols, &mut out);
        dot(&out, &dy)
    };
    let numeric = finite_difference(loss, &table, 1e-4);
    assert_gradient("embedding dtable", &analytic, &numeric, 1e-7);
}

#[test]
fn embedding_grad_index_lists_unique_ids_in_order() {
    let index = EmbeddingGradIndex::new(gpu(), &[5, 2, 5, 9, 2, 5]).unwrap();
    assert_eq!(index.unique_ids(), &[2, 5, 9]);
    assert_eq!(index.tokens(), 6);
    let empty = EmbeddingGradIndex::new(gpu(), &[]).unwrap();
    assert!(empty.unique_ids().is_empty());
}

//! CPU f64 references: plain causal softmax attention with the same masking rules.

use super::AttentionShape;

/// Start of query row `(b, t, h)` in `q`, `out`, `dout`.
fn q_row(s: &AttentionShape, b: usize, t: usize, h: usize) -> usize {
    ((b * s.q_len + t) * s.n_heads + h) * s.head_dim
}

/// Start of key row `(b, j, kv_head)` in `k`, `v`.
fn kv_row(s: &AttentionShape, b: usize, j: usize, h: usize) -> usize {
    ((b * s.kv_len + j) * s.n_kv_heads + h / s.group_size()) * s.head_dim
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Softmax probabilities of query `(b, t, h)` over the keys it attends, and their lse.
fn probabilities(
    s: &AttentionShape,
    q: &[f64],
    k: &[f64],
    keys: usize,
    (b, t, h): (usize, usize, usize),
    scale: f64,
) -> (Vec<f64>, f64) {
    let d = s.head_dim;
    let qi = &q[q_row(s, b, t, h)..][..d];
    let scores: Vec<f64> = (0..keys)
        .map(|j| scale * dot(qi, &k[kv_row(s, b, j, h)..][..d]))
        .collect();
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = scores.iter().map(|x| (x - max).exp()).sum();
    let lse = max + sum.ln();
    (scores.iter().map(|x| (x - lse).exp()).collect(), lse)
}

/// Every attending query row `(b, t, h, keys)`.
fn query_rows<'a>(
    s: &'a AttentionShape,
    seq_lens: &'a [u32],
) -> impl Iterator<Item = (usize, usize, usize, usize)> + 'a {
    (0..s.batch).flat_map(move |b| {
        (0..s.q_len).flat_map(move |t| {
            let keys = s.attended_keys(seq_lens[b] as usize, t);
            (0..s.n_heads).filter_map(move |h| (keys > 0).then_some((b, t, h, keys)))
        })
    })
}

/// `(out [B, Tq, Hq, D], lse [B, Hq, Tq])`; padding rows are 0.
pub fn attention_forward(
    s: &AttentionShape,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    seq_lens: &[u32],
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let d = s.head_dim;
    let mut out = vec![0.0; s.q_dims().iter().product()];
    let mut lse = vec![0.0; s.lse_dims().iter().product()];
    for (b, t, h, keys) in query_rows(s, seq_lens) {
        let (p, row_lse) = probabilities(s, q, k, keys, (b, t, h), scale);
        lse[(b * s.n_heads + h) * s.q_len + t] = row_lse;
        let o = &mut out[q_row(s, b, t, h)..][..d];
        for (j, pj) in p.iter().enumerate() {
            for (o, vj) in o.iter_mut().zip(&v[kv_row(s, b, j, h)..][..d]) {
                *o += pj * vj;
            }
        }
    }
    (out, lse)
}

/// [`attention_forward`] with row `b`'s queries at positions `starts[b] + t` (see
/// [`super::attention_forward_at`]): each row is the uniform case with its own offset.
pub fn attention_forward_at(
    s: &AttentionShape,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    seq_lens: &[u32],
    starts: &[u32],
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let row = AttentionShape { batch: 1, ..*s };
    let q_row: usize = row.q_dims().iter().product();
    let kv_row: usize = row.kv_dims().iter().product();
    let (mut out, mut lse) = (Vec::new(), Vec::new());
    for b in 0..s.batch {
        let one = AttentionShape {
            q_offset: starts[b] as usize,
            ..row
        };
        let (o, l) = attention_forward(
            &one,
            &q[b * q_row..][..q_row],
            &k[b * kv_row..][..kv_row],
            &v[b * kv_row..][..kv_row],
            &seq_lens[b..=b],
            scale,
        );
        out.extend(o);
        lse.extend(l);
    }
    (out, lse)
}

/// `(dq, dk, dv)` of [`attention_forward`] for the upstream gradient `dout`.
pub fn attention_backward(
    s: &AttentionShape,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    seq_lens: &[u32],
    scale: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let d = s.head_dim;
    let mut dq = vec![0.0; q.len()];
    let mut dk = vec![0.0; k.len()];
    let mut dv = vec![0.0; v.len()];
    for (b, t, h, keys) in query_rows(s, seq_lens) {
        let (p, _) = probabilities(s, q, k, keys, (b, t, h), scale);
        let qr = q_row(s, b, t, h);
        let dout_row = &dout[qr..][..d];
        let dp: Vec<f64> = (0..keys)
            .map(|j| dot(dout_row, &v[kv_row(s, b, j, h)..][..d]))
            .collect();
        let delta = dot(&p, &dp);
        for j in 0..keys {
            let kr = kv_row(s, b, j, h);
            let ds = scale * p[j] * (dp[j] - delta);
            for x in 0..d {
                dq[qr + x] += ds * k[kr + x];
                dk[kr + x] += ds * q[qr + x];
                dv[kr + x] += p[j] * dout_row[x];
            }
        }
    }
    (dq, dk, dv)
}

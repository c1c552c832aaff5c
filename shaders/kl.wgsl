// The fused KL loss between the base model's and the fine-tuned model's next-token
// distributions, one workgroup per row of logits:
//   p = softmax(zb / T) (base), q = softmax(zt / T) (fine-tuned);
//   forward: row_loss = T² KL(p‖q), dzt = grad_scale · T · (q − p);
//   reverse: row_loss = T² KL(q‖p), dzt = grad_scale · T · q ∘ (log q − log p − KL(q‖p)).
// Pass 1 walks both rows once with an online max/sum per distribution, plus the online sum
// Σ f·(x_f − x_g) for the first distribution f of the KL (rescaled whenever its max moves);
// pass 2 writes the gradient. Neither softmax is ever stored. Masked rows get loss 0, gradient 0.

struct Params {
    rows: u32,
    vocab: u32,
    inv_temperature: f32,
    // 0: forward KL(p‖q); 1: reverse KL(q‖p).
    reverse: u32,
    // T², so the loss keeps its scale across temperatures.
    loss_scale: f32,
    // grad_scale · T.
    grad_scale: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> zt: array<f32>;
@group(0) @binding(2) var<storage, read> zb: array<f32>;
@group(0) @binding(3) var<storage, read> mask: array<u32>;
@group(0) @binding(4) var<storage, read_write> row_loss: array<f32>;
@group(0) @binding(5) var<storage, read_write> dzt: array<f32>;

override WG: u32 = 256u;

// Below every finite logit: the running max of an empty set.
const EMPTY_MAX: f32 = -3.4028235e38;

// Online softmax statistics of both distributions over part of a row. `f` is the first
// argument of the KL, `g` the second: s = Σ exp(x − m), w = Σ exp(x_f − m_f)·(x_f − x_g).
struct Stats {
    m_f: f32,
    s_f: f32,
    w_f: f32,
    m_g: f32,
    s_g: f32,
}

var<workgroup> partial: array<Stats, WG>;
var<workgroup> row_active: u32;

fn empty_stats() -> Stats {
    return Stats(EMPTY_MAX, 0.0, 0.0, EMPTY_MAX, 0.0);
}

// The statistics of the union of two disjoint parts, each rescaled to the larger max.
fn merge(x: Stats, y: Stats) -> Stats {
    let m_f = max(x.m_f, y.m_f);
    let xf = exp(x.m_f - m_f);
    let yf = exp(y.m_f - m_f);
    let m_g = max(x.m_g, y.m_g);
    let xg = exp(x.m_g - m_g);
    let yg = exp(y.m_g - m_g);
    return Stats(m_f, x.s_f * xf + y.s_f * yf, x.w_f * xf + y.w_f * yf,
                 m_g, x.s_g * xg + y.s_g * yg);
}

// (zb, zt)[row, v] / T: the base and fine-tuned logits at temperature T.
fn scaled_logits(row: u32, v: u32) -> vec2<f32> {
    let i = row * params.vocab + v;
    return vec2<f32>(zb[i], zt[i]) * params.inv_temperature;
}

// (x_f, x_g): the scaled logits in KL argument order.
fn kl_order(base_tuned: vec2<f32>) -> vec2<f32> {
    return select(base_tuned, base_tuned.yx, params.reverse == 1u);
}

// Pass 1: every thread summarises a strided part of the row; a fixed tree merges the parts.
fn row_statistics(row: u32, lid: u32) -> Stats {
    var mine = empty_stats();
    for (var v = lid; v < params.vocab; v = v + WG) {
        let x = kl_order(scaled_logits(row, v));
        mine = merge(mine, Stats(x.x, 1.0, x.x - x.y, x.y, 1.0));
    }
    partial[lid] = mine;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if lid < stride {
            partial[lid] = merge(partial[lid], partial[lid + stride]);
        }
        workgroupBarrier();
    }
    return partial[0];
}

// Pass 2: the gradient with respect to zt. `lse_tuned` = log Σ exp(zt/T); `shift` =
// lse_tuned − lse_base. log p is derived from log q and log q − log p so that q and p carry the
// same rounding of lse_tuned, which cancels in q − p.
fn write_gradient(row: u32, lid: u32, lse_tuned: f32, shift: f32, kl: f32) {
    for (var v = lid; v < params.vocab; v = v + WG) {
        let x = scaled_logits(row, v);
        let log_q = x.y - lse_tuned;
        let log_q_over_p = (x.y - x.x) - shift;
        let q = exp(log_q);
        var g = q - exp(log_q - log_q_over_p);
        if params.reverse == 1u {
            g = q * (log_q_over_p - kl);
        }
        dzt[row * params.vocab + v] = params.grad_scale * g;
    }
}

@compute @workgroup_size(WG)
fn kl_loss(@builtin(workgroup_id) wid: vec3<u32>,
           @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let row = flat_workgroup_id(wid, nwg);
    if row >= params.rows {
        return;
    }
    if lid == 0u {
        row_active = mask[row];
    }
    if workgroupUniformLoad(&row_active) == 0u {
        for (var v = lid; v < params.vocab; v = v + WG) {
            dzt[row * params.vocab + v] = 0.0;
        }
        if lid == 0u {
            row_loss[row] = 0.0;
        }
        return;
    }
    let s = row_statistics(row, lid);
    // lse_g − lse_f as one log of a ratio: both log-sum-exps are large, their difference
    // small when the models agree. KL(f‖g) = Σ f (x_f − x_g) − lse_f + lse_g.
    let gap = (s.m_g - s.m_f) + log(s.s_g / s.s_f);
    let kl = s.w_f / s.s_f + gap;
    if params.reverse == 1u {
        write_gradient(row, lid, s.m_f + log(s.s_f), -gap, kl);
    } else {
        write_gradient(row, lid, s.m_g + log(s.s_g), gap, kl);
    }
    if lid == 0u {
        row_loss[row] = params.loss_scale * kl;
    }
}

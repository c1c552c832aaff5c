// The fused KL loss between the base model's and the fine-tuned model's next-token
// distributions, one workgroup per row of logits:
//   p = softmax(zb / T) (base), q = softmax(zt / T) (fine-tuned);
//   forward: row_loss = T² KL(p‖q), dzt = grad_scale · T · (q − p);
//   reverse: row_loss = T² KL(q‖p), dzt = grad_scale · T · q ∘ (log q − log p − KL(q‖p)).
// Pass 1 walks both rows once with online softmax statistics (common.wgsl) per distribution,
// weighting the first distribution f of the KL by x_f − x_g to get Σ f·(x_f − x_g) as well;
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

// Online softmax statistics (common.wgsl) of both distributions over a row. `f` is the first
// argument of the KL and weighs each value by x_f − x_g, so f.z = Σ exp(x_f − m_f)·(x_f − x_g);
// `g` is the second argument and carries no weights.
struct Stats {
    f: vec3<f32>,
    g: vec3<f32>,
}

var<workgroup> row_active: u32;

// (zb, zt)[row, v] / T: the base and fine-tuned logits at temperature T.
fn scaled_logits(row: u32, v: u32) -> vec2<f32> {
    let i = row * params.vocab + v;
    return vec2<f32>(zb[i], zt[i]) * params.inv_temperature;
}

// (x_f, x_g): the scaled logits in KL argument order.
fn kl_order(base_tuned: vec2<f32>) -> vec2<f32> {
    return select(base_tuned, base_tuned.yx, params.reverse == 1u);
}

// Pass 1: every thread summarises a strided part of the row; fixed trees merge the parts.
fn row_statistics(row: u32, lid: u32) -> Stats {
    var f = ONLINE_EMPTY;
    var g = ONLINE_EMPTY;
    for (var v = lid; v < params.vocab; v = v + REDUCE_WG) {
        let x = kl_order(scaled_logits(row, v));
        f = online_add(f, x.x, x.x - x.y);
        g = online_add(g, x.y, 0.0);
    }
    return Stats(workgroup_online_merge(lid, f), workgroup_online_merge(lid, g));
}

// Pass 2: the gradient with respect to zt. `lse_tuned` = log Σ exp(zt/T); `shift` =
// lse_tuned − lse_base. log p is derived from log q and log q − log p so that q and p carry the
// same rounding of lse_tuned, which cancels in q − p.
fn write_gradient(row: u32, lid: u32, lse_tuned: f32, shift: f32, kl: f32) {
    for (var v = lid; v < params.vocab; v = v + REDUCE_WG) {
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

@compute @workgroup_size(REDUCE_WG)
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
        for (var v = lid; v < params.vocab; v = v + REDUCE_WG) {
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
    let gap = (s.g.x - s.f.x) + log(s.g.y / s.f.y);
    let kl = s.f.z / s.f.y + gap;
    if params.reverse == 1u {
        write_gradient(row, lid, s.f.x + log(s.f.y), -gap, kl);
    } else {
        write_gradient(row, lid, s.g.x + log(s.g.y), gap, kl);
    }
    if lid == 0u {
        row_loss[row] = params.loss_scale * kl;
    }
}

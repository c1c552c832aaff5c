//! The loss every attack and capability measure shares, on the GPU: per-sequence losses
//! against a CPU f64 cross-entropy of the model's own logits, the greedy check against the
//! logits' argmax, and the gradient at the input embeddings (a tap at hidden state 0, through
//! a `Replace` hook) against central finite differences.

use std::path::PathBuf;

use es2_wgpu::eval::loss::{score, scored_batch, Scored, Wanted};
use es2_wgpu::eval::subject::{Prompting, Subject};
use es2_wgpu::model::{open_model, Batch, Hook, HookAction, LoadOptions, Output, Positions};
use es2_wgpu::ops::cross_entropy::reference::cross_entropy_loss;
use es2_wgpu::testing::{f64s, gpu, randn, upload};

fn stories() -> (es2_wgpu::model::Transformer, es2_wgpu::text::Tokenizer) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/stories260K");
    open_model(gpu(), &dir.to_string_lossy(), &LoadOptions::default()).unwrap()
}

#[test]
fn sequence_losses_and_greedy_hits_match_the_logits() {
    let (model, tokenizer) = stories();
    let subject = Subject {
        model: &model,
        tokenizer: &tokenizer,
        adapters: true,
        prompting: Prompting {
            chat: false,
            max_len: 64,
        },
    };
    let contexts = [
        subject.encode("Once upon a time, there was a").unwrap(),
        subject.encode("The cat sat").unwrap(),
    ];
    let continuations = [
        tokenizer.encode_piece("little girl named").unwrap(),
        tokenizer.encode_piece("on").unwrap(),
    ];
    let items: Vec<Scored> = contexts
        .iter()
        .zip(&continuations)
        .map(|(c, t)| Scored::continuation(c, t))
        .collect();
    let batch = scored_batch(gpu(), &subject, &items).unwrap();
    let wanted = Wanted {
        gradient: false,
        greedy: true,
    };
    let scoring = score(gpu(), &subject, &batch, &[], wanted).unwrap();
    let vocab = model.config.vocab_size;
    let plain = Batch::new(gpu(), &batch.sequences, vocab).unwrap();
    let forward = subject.run(gpu(), &plain, Output::Logits, &[]).unwrap();
    let logits = f64s(&forward.logits.unwrap().to_f32(gpu()).unwrap());
    let targets = &batch.targets.as_ref().unwrap().host;
    let reference = cross_entropy_loss(&logits, targets, vocab);
    for (b, item) in items.iter().enumerate() {
        let rows = b * batch.seq..(b + 1) * batch.seq;
        let want: f64 = reference[rows.clone()].iter().sum();
        let got = scoring.losses[b];
        assert_eq!(got.tokens, item.learned.iter().filter(|&&l| l).count());
        assert!(
            (got.total - want).abs() < 1e-4 * want,
            "{} vs {want}",
            got.total
        );
        let greedy = rows.filter(|&r| targets[r] != u32::MAX).all(|r| {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let best = (0..vocab)
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap();
            best as u32 == targets[r]
        });
        assert_eq!(scoring.greedy.as_ref().unwrap()[b], greedy);
    }
    // The model's own greedy continuation is a greedy hit.
    let next = {
        let row = plain.seq + contexts[1].len() - 1;
        let z = &logits[row * vocab..(row + 1) * vocab];
        (0..vocab).max_by(|&a, &b| z[a].total_cmp(&z[b])).unwrap() as u32
    };
    let own = Scored::continuation(&contexts[1], &[next]);
    let batch = scored_batch(gpu(), &subject, &[own]).unwrap();
    let scoring = score(gpu(), &subject, &batch, &[], wanted).unwrap();
    assert_eq!(scoring.greedy, Some(vec![true]));
}

#[test]
fn the_input_gradient_matches_finite_differences() {
    let (model, tokenizer) = stories();
    let subject = Subject {
        model: &model,
        tokenizer: &tokenizer,
        adapters: true,
        prompting: Prompting {
            chat: false,
            max_len: 64,
        },
    };
    let cols = subject.width();
    let context = subject
        .encode("Lily wanted to play with her friend")
        .unwrap();
    let item = Scored::continuation(&context, &tokenizer.encode_piece("in the park").unwrap());
    let batch = scored_batch(gpu(), &subject, &[item]).unwrap();
    // Free embeddings at positions 2..5, as the soft prompt places them.
    let (start, len) = (2, 3);
    let values = randn(11, len * cols, 0.3);
    let hook = |values: &[f32]| Hook {
        hidden: 0,
        positions: Positions::Span { start, len },
        action: HookAction::Replace {
            value: upload(gpu(), [len, cols], values),
        },
    };
    let wanted = Wanted {
        gradient: true,
        greedy: false,
    };
    let scoring = score(gpu(), &subject, &batch, &[hook(&values)], wanted).unwrap();
    let gradient = scoring.gradient.unwrap();
    let analytic = &gradient[start * cols..(start + len) * cols];
    // Rows the hook replaced get the gradient of the mean loss; rows before them too.
    assert!(analytic.iter().any(|&g| g != 0.0));
    let direction = randn(12, len * cols, 1.0);
    let along: f64 = analytic
        .iter()
        .zip(&direction)
        .map(|(g, d)| f64::from(*g) * f64::from(*d))
        .sum();
    let loss_at = |t: f32| {
        let moved: Vec<f32> = values
            .iter()
            .zip(&direction)
            .map(|(v, d)| v + t * d)
            .collect();
        let s = score(gpu(), &subject, &batch, &[hook(&moved)], Wanted::default()).unwrap();
        s.losses[0].mean()
    };
    let h = 2e-3;
    let numeric = (loss_at(h) - loss_at(-h)) / (2.0 * f64::from(h));
    eprintln!("directional derivative {along}, finite differences {numeric}");
    assert!(
        (along - numeric).abs() < 5e-3 * numeric.abs().max(1e-3),
        "directional derivative {along} vs finite differences {numeric}"
    );
}

/// A Llama shape whose untied 140,000-token head takes the 250 rows of two sequences of 125
/// tokens in two row chunks (192 + 58).
const WIDE: &str = r#"{
    "architectures": ["LlamaForCausalLM"], "vocab_size": 140000, "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4,
    "num_key_value_heads": 2, "tie_word_embeddings": false
}"#;

#[test]
fn scoring_across_lm_head_chunks_matches_the_logits() {
    use es2_wgpu::model::{Config, SeededInit, Transformer};
    let config = Config::from_json(WIDE).unwrap();
    let init = SeededInit { seed: 8, std: 0.5 };
    let model = Transformer::from_source(gpu(), config, &init, &LoadOptions::default()).unwrap();
    let (_, tokenizer) = stories();
    let subject = Subject {
        model: &model,
        tokenizer: &tokenizer,
        adapters: true,
        prompting: Prompting {
            chat: false,
            max_len: 128,
        },
    };
    let vocab = model.config.vocab_size;
    let mut rng = es2_wgpu::rng::Rng::new(4);
    let mut draw = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.below(vocab) as u32).collect() };
    let first = Scored::continuation(&draw(115), &draw(10));
    // The second sequence's continuation is the model's own greedy choice, token by token, and
    // its scored rows (184..199 of the batch) straddle the chunk boundary at row 192.
    let context = draw(60);
    let mut continuation = Vec::new();
    for _ in 0..16 {
        let mut ids = context.clone();
        ids.extend_from_slice(&continuation);
        let both = Batch::new(gpu(), &[first.ids.clone(), ids], vocab).unwrap();
        let last = subject.run(gpu(), &both, Output::LastLogits, &[]).unwrap();
        let z = last.logits.unwrap().to_f32(gpu()).unwrap();
        let row = &z[vocab..];
        let best = (0..vocab)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap();
        continuation.push(best as u32);
    }
    let items = [first, Scored::continuation(&context, &continuation)];
    let batch = scored_batch(gpu(), &subject, &items).unwrap();
    assert_eq!(batch.rows(), 250);
    let chunks = es2_wgpu::model::head::head_chunks(250, vocab).count();
    assert_eq!(chunks, 2);
    let wanted = Wanted {
        gradient: false,
        greedy: true,
    };
    let scoring = score(gpu(), &subject, &batch, &[], wanted).unwrap();
    let plain = Batch::new(gpu(), &batch.sequences, vocab).unwrap();
    let forward = subject.run(gpu(), &plain, Output::Logits, &[]).unwrap();
    let logits = f64s(&forward.logits.unwrap().to_f32(gpu()).unwrap());
    let targets = &batch.targets.as_ref().unwrap().host;
    let reference = cross_entropy_loss(&logits, targets, vocab);
    for b in 0..2 {
        let rows = b * batch.seq..(b + 1) * batch.seq;
        let want: f64 = reference[rows].iter().sum();
        let got = scoring.losses[b].total;
        assert!((got - want).abs() < 1e-5 * want, "{got} vs {want}");
    }
    // Random tokens are not the model's choice; its own greedy tokens are, on both sides of
    // the boundary.
    assert_eq!(scoring.greedy, Some(vec![false, true]));
}

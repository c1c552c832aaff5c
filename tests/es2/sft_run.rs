//! Supervised fine-tuning runs end to end through the library on the real stories260K
//! checkpoint, with small conversation files the tests write: the held-out loss falls, every
//! output of a run is written and loads back, a resumed run matches an uninterrupted one bit
//! for bit, the tokens learned are the replies, and bad data or a missing `data` field is a
//! clear error.

use std::path::{Path, PathBuf};

use es2_wgpu::es2::data::tokenize_conversations;
use es2_wgpu::es2::{Quiet, Schedule, Summary, Task, TrainConfig, Trainer};
use es2_wgpu::model::{open_model, LoadOptions, LoraConfig};
use es2_wgpu::testing::{assert_close, f64s, gpu, rel_error};
use es2_wgpu::text::{Conversation, Message, Tokenizer};
use es2_wgpu::Error;
use serde_json::{json, Value};

use super::bad_data::Files;
use super::resume::{step_metrics, trained_bits};
use super::run::{check_curves, json_lines, logits, steps_and_evaluations, Messages};

/// The stories260K checkpoint of the repository.
fn stories() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models/stories260K")
        .to_string_lossy()
        .into_owned()
}

const ANIMALS: [&str; 12] = [
    "cat", "dog", "bird", "fish", "frog", "duck", "bear", "bunny", "mouse", "horse", "cow", "pig",
];

/// Conversations in the stories' own words with one pattern to learn (which held-out
/// conversations share): 24 prompt/response pairs, and 6 message lists, each with a system
/// message and two exchanges.
fn conversations() -> Vec<Conversation> {
    let mut all: Vec<Conversation> = ANIMALS
        .iter()
        .flat_map(|animal| {
            [
                Conversation::pair(
                    format!("Tell me about the {animal}."),
                    format!("The {animal} was happy. The {animal} liked to play in the sun."),
                ),
                Conversation::pair(
                    format!("Where is the {animal}?"),
                    format!("The {animal} is in the park with its mom."),
                ),
            ]
        })
        .collect();
    for animal in &ANIMALS[..6] {
        let message = |role: &str, content: String| Message {
            role: role.into(),
            content,
        };
        all.push(Conversation {
            messages: vec![
                message("system", "You tell short stories.".into()),
                Message::user(format!("Tell me about the {animal}.")),
                Message::assistant(format!(
                    "The {animal} was happy. The {animal} liked to play in the sun."
                )),
                Message::user(format!("Where is the {animal}?")),
                Message::assistant(format!("The {animal} is in the park with its mom.")),
            ],
        });
    }
    all
}

/// A conversation as a row: `{"prompt", "response"}` when it is one and `pairs` allows, else
/// `{"messages": [...]}`.
fn row(c: &Conversation, pairs: bool) -> Value {
    match &c.messages[..] {
        [user, reply] if pairs && user.role == "user" => {
            json!({"prompt": user.content, "response": reply.content})
        }
        messages => json!({ "messages": messages }),
    }
}

/// The conversations as JSON Lines, pairs as `{"prompt", "response"}` rows.
fn write_jsonl(files: &Files, name: &str) -> PathBuf {
    let lines: Vec<String> = conversations()
        .iter()
        .map(|c| row(c, true).to_string())
        .collect();
    files.write(name, lines.join("\n") + "\n")
}

/// The conversations as a JSON array of `{"messages": [...]}` rows.
fn write_json_messages(files: &Files, name: &str) -> PathBuf {
    let rows: Vec<Value> = conversations().iter().map(|c| row(c, false)).collect();
    files.write(name, serde_json::to_string_pretty(&rows).unwrap())
}

/// A short SFT run on stories260K over `data`, writing to `out`.
fn sft_config(data: PathBuf, out: PathBuf) -> TrainConfig {
    let mut config = TrainConfig {
        model: stories(),
        task: Task::Sft,
        data: Some(data),
        out,
        steps: 12,
        sft_batch: 8,
        max_len: 64,
        val_fraction: 0.2,
        eval_every: 6,
        save_every: 6,
        seed: 5,
        lora: Some(LoraConfig {
            rank: 8,
            alpha: 16.0,
            ..LoraConfig::default()
        }),
        ..TrainConfig::default()
    };
    config.optimizer.lr = 1e-2;
    config
}

/// Held-out loss before and after, printed, and checked to have fallen to half at most.
fn check_held_out_falls(what: &str, summary: &Summary) {
    let (before, after) = (
        summary.before.sft().unwrap().loss,
        summary.after.sft().unwrap().loss,
    );
    eprintln!(
        "{what}: held-out loss {before:.4} -> {after:.4} after {} steps, {:.1} s",
        summary.steps, summary.seconds
    );
    assert!(after < 0.5 * before, "{what}: {before} -> {after}");
}

/// The logits of `text`, as the trained model sees a prompt, from `model` opened at `spec`
/// (with `adapter` loaded when given).
fn logits_of(spec: &str, adapter: Option<&Path>, ids: &[u32]) -> Vec<f32> {
    let (mut model, _) = open_model(gpu(), spec, &LoadOptions::default()).unwrap();
    if let Some(dir) = adapter {
        model.load_adapter(gpu(), dir).unwrap();
    }
    logits(&model, ids)
}

#[test]
fn a_lora_sft_run_learns_held_out_replies_and_writes_every_output() {
    let files = Files::new("sft-lora");
    let data = write_jsonl(&files, "chats.jsonl");
    let out = files.0.join("out");
    let config = TrainConfig {
        merge: true,
        ..sft_config(data, out.clone())
    };
    let mut messages = Messages::default();
    let mut trainer = Trainer::new(gpu(), config, &mut messages).unwrap();
    let summary = trainer.run(&mut Quiet).unwrap();
    check_held_out_falls("LoRA", &summary);
    // 30 conversations, a fifth held out.
    let split = messages
        .0
        .iter()
        .find(|m| m.contains("conversations for training"));
    assert!(
        split.is_some_and(|m| m.contains(": 24 conversations") && m.contains("6 held out")),
        "{:?}",
        messages.0
    );

    // metrics.jsonl holds SFT lines only: each step's loss and learned tokens, each
    // evaluation's held-out loss.
    let lines = json_lines(&out.join("metrics.jsonl"));
    let (steps, evals) = steps_and_evaluations(&lines);
    assert_eq!(steps.len() + evals.len(), lines.len());
    assert_eq!(steps.len(), 12);
    for s in &steps {
        let mut keys: Vec<&str> = s.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort();
        let want = [
            "grad_norm",
            "learned_tokens",
            "loss",
            "lr",
            "peak_bytes",
            "step",
            "tokens",
        ];
        assert_eq!(keys, [&want[..], &["tokens_per_s"]].concat());
        assert!(s["learned_tokens"].as_u64().unwrap() > 0);
    }
    let eval_steps: Vec<u64> = evals
        .iter()
        .map(|e| e["eval_step"].as_u64().unwrap())
        .collect();
    assert_eq!(eval_steps, [0, 6, 12]);
    assert!(evals.iter().all(|e| e.as_object().unwrap().len() == 2));
    assert_eq!(
        evals[0]["val_loss"],
        json!(summary.before.sft().unwrap().loss)
    );

    let labels = ["training loss", "held-out loss"];
    check_curves(&summary.curves, &labels, &[(12, 1), (3, 1)]);
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(written["task"], "sft");
    assert_eq!(
        written["after"]["loss"],
        json!(summary.after.sft().unwrap().loss)
    );
    assert!(written.get("layers").is_none(), "{written}");
    assert!(out.join("checkpoints/step-000006/state.json").exists());

    // The adapter reloads onto the base, and merged/ loads, both with the trained logits.
    let ids = trainer.tokenizer.encode("Tell me about the cat.").unwrap();
    let trained = f64s(&logits(&trainer.models.tuned, &ids));
    assert_close(
        "adapter reloaded",
        &logits_of(&stories(), Some(&out), &ids),
        &trained,
        1e-6,
    );
    let merged = out.join("merged").to_string_lossy().into_owned();
    assert_close(
        "merged folder",
        &logits_of(&merged, None, &ids),
        &trained,
        1e-5,
    );
    let moved = rel_error(&logits_of(&stories(), None, &ids), &trained);
    assert!(
        moved > 1e-3,
        "training left the logits where they were ({moved:e})"
    );
}

#[test]
fn a_full_sft_run_on_message_lists_writes_a_model_folder_that_loads() {
    let files = Files::new("sft-full");
    let data = write_json_messages(&files, "chats.json");
    let out = files.0.join("out");
    let mut config = TrainConfig {
        lora: None,
        steps: 8,
        eval_every: 0,
        save_every: 0,
        ..sft_config(data, out.clone())
    };
    config.optimizer.lr = 3e-3;
    let mut trainer = Trainer::new(gpu(), config, &mut Quiet).unwrap();
    let summary = trainer.run(&mut Quiet).unwrap();
    check_held_out_falls("full", &summary);
    assert!(!out.join("adapter_model.safetensors").exists());
    let ids = trainer.tokenizer.encode("Where is the dog?").unwrap();
    let folder = out.join("model").to_string_lossy().into_owned();
    assert_close(
        "full model folder",
        &logits_of(&folder, None, &ids),
        &f64s(&logits(&trainer.models.tuned, &ids)),
        1e-6,
    );
}

/// LoRA (with dropout, whose masks come from the step's seed) and full fine-tuning, with
/// warmup, a cosine schedule and weight decay: a run checkpointed at step 4, stopped after
/// step 5 and resumed ends with the parameters and metrics of an uninterrupted run.
#[test]
fn resumed_sft_runs_match_uninterrupted_runs_bit_for_bit() {
    let files = Files::new("sft-resume");
    let data = write_jsonl(&files, "chats.jsonl");
    let lora = Some(LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.1,
        ..LoraConfig::default()
    });
    for (kind, lora) in [("lora", lora), ("full", None)] {
        let config = |out: PathBuf, save_every| {
            let mut config = TrainConfig {
                lora: lora.clone(),
                steps: 7,
                sft_batch: 5,
                eval_every: 3,
                save_every,
                ..sft_config(data.clone(), out)
            };
            config.optimizer.schedule = Schedule::Cosine;
            config.optimizer.warmup = 2;
            config.optimizer.weight_decay = 0.01;
            config
        };
        let whole_out = files.0.join(format!("{kind}-whole"));
        let mut whole = Trainer::new(gpu(), config(whole_out.clone(), 0), &mut Quiet).unwrap();
        let whole_summary = whole.run(&mut Quiet).unwrap();

        let split_out = files.0.join(format!("{kind}-split"));
        let mut first = Trainer::new(gpu(), config(split_out.clone(), 4), &mut Quiet).unwrap();
        for _ in 0..5 {
            first.advance(&mut Quiet).unwrap();
        }
        drop(first);
        let mut resumed = Trainer::resume(gpu(), &split_out, None, &mut Quiet).unwrap();
        assert_eq!(
            resumed.step, 4,
            "{kind}: resumed from the step-4 checkpoint"
        );
        let resumed_summary = resumed.run(&mut Quiet).unwrap();

        assert_eq!(trained_bits(&whole), trained_bits(&resumed), "{kind}");
        assert_eq!(step_metrics(&whole_out), step_metrics(&split_out), "{kind}");
        assert_eq!(whole_summary.before, resumed_summary.before, "{kind}");
        assert_eq!(whole_summary.after, resumed_summary.after, "{kind}");
    }
}

/// The tokens a conversation teaches, decoded.
fn learned_text(tokenizer: &Tokenizer, ids: &[u32], learned: &[bool]) -> Vec<String> {
    let mut spans = Vec::new();
    let mut current = Vec::new();
    for (&id, &l) in ids.iter().zip(learned) {
        if l {
            current.push(id);
        } else if !current.is_empty() {
            spans.push(std::mem::take(&mut current));
        }
    }
    spans.extend((!current.is_empty()).then_some(current));
    spans
        .iter()
        .map(|s| {
            let text = tokenizer.decode(s).unwrap();
            let eos = tokenizer.eos_ids().contains(s.last().unwrap());
            format!("{text}{}", if eos { "<eos>" } else { "" })
        })
        .collect()
}

/// What a model learns of a multi-turn conversation is each assistant reply and what closes
/// it: in plain text the reply and the end-of-sequence token (stories260K has no chat
/// template); through a chat template (tiny-llama's ChatML) the reply and `<|im_end|>`. The
/// system and user messages are never learned. A conversation over `max_len` keeps the
/// whole replies that fit.
#[test]
fn the_tokens_learned_are_the_assistant_replies_and_what_closes_them() {
    let multi_turn = conversations().pop().unwrap();
    let replies: Vec<&str> = multi_turn.messages[2..]
        .iter()
        .step_by(2)
        .map(|m| m.content.as_str())
        .collect();

    let (_, plain) = open_model(gpu(), &stories(), &LoadOptions::default()).unwrap();
    let (ids, learned) = plain
        .encode_conversation(&multi_turn.messages, false)
        .unwrap();
    let want: Vec<String> = replies.iter().map(|r| format!("{r}<eos>")).collect();
    assert_eq!(learned_text(&plain, &ids, &learned), want);

    let (_, chat) = open_model(gpu(), "tiny-llama", &LoadOptions::default()).unwrap();
    let (ids, learned) = chat
        .encode_conversation(&multi_turn.messages, true)
        .unwrap();
    let spans = learned_text(&chat, &ids, &learned);
    // decode skips special tokens, so the closing <|im_end|> is checked by id.
    assert_eq!(spans.len(), 2, "{spans:?}");
    for (span, reply) in spans.iter().zip(&replies) {
        assert_eq!(span.trim(), reply.trim(), "{spans:?}");
    }
    let im_end = chat.encode("<|im_end|>").unwrap();
    assert_eq!(im_end.len(), 1);
    let closes = ids
        .windows(2)
        .zip(learned.windows(2))
        .filter(|(w, l)| w[1] == im_end[0] && l[1] && l[0])
        .count();
    assert_eq!(closes, 2, "each reply's <|im_end|> is learned");

    // Cut under max_len: the second exchange no longer fits, the first reply stays whole.
    let first = learned.iter().position(|&l| l).unwrap();
    let first_end = first + learned[first..].iter().take_while(|&&l| l).count();
    let (examples, truncated) =
        tokenize_conversations(&chat, &[multi_turn], true, first_end + 3).unwrap();
    assert_eq!(truncated, 1);
    assert_eq!(examples[0].ids, ids[..first_end]);
    assert_eq!(
        learned_text(&chat, &examples[0].ids, &examples[0].learned).len(),
        1
    );
}

/// Each bad file is refused by `Trainer::new` with an error naming the file, the row (or
/// line) and the field at fault.
#[test]
fn bad_conversation_files_name_the_file_the_row_and_the_field() {
    let files = Files::new("sft-bad");
    let mut latin1 = b"{\"prompt\": \"fine\", \"response\": \"ok\"}\n".to_vec();
    latin1.extend_from_slice(b"{\"prompt\": \"caf\xE9\", \"response\": \"ok\"}\n");
    let cases: [(&str, Vec<u8>, &[&str]); 6] = [
        (
            "missing.json",
            br#"[{"prompt": "a", "response": "b"}, {"prompt": "no reply"}]"#.to_vec(),
            &["row 2", "\"response\"", "found: prompt"],
        ),
        (
            "no-assistant.jsonl",
            concat!(
                "{\"prompt\": \"a\", \"response\": \"b\"}\n",
                "\n",
                "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n"
            )
            .as_bytes()
            .to_vec(),
            &["line 3", "field \"messages\"", "no assistant message"],
        ),
        (
            "role.json",
            br#"[{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}]"#
                .to_vec(),
            &["row 1", "field \"messages\"[1]", "field \"role\"", "'bot'"],
        ),
        (
            "empty.csv",
            b"prompt,response\nq,a\nq2,\n".to_vec(),
            &["row 3", "field \"response\" is empty"],
        ),
        (
            "latin1.jsonl",
            latin1,
            &["not UTF-8", "byte 52 (line 2) is 0xE9"],
        ),
        (
            "chats.txt",
            b"hello".to_vec(),
            &["unknown dataset format '.txt'"],
        ),
    ];
    for (name, bytes, parts) in cases {
        let data = files.write(name, bytes);
        let config = sft_config(data.clone(), files.0.join("out"));
        let err = Trainer::new(gpu(), config, &mut Quiet)
            .err()
            .unwrap()
            .to_string();
        eprintln!("{name}: {err}");
        assert!(
            err.contains(&*data.to_string_lossy()),
            "no file name: {err}"
        );
        for part in parts {
            assert!(err.contains(part), "{name}: no {part:?} in: {err}");
        }
    }
    assert!(!files.0.join("out").exists(), "a refused run wrote nothing");
}

#[test]
fn sft_without_data_and_data_under_es2_are_errors_naming_the_field() {
    let files = Files::new("sft-config");
    let data = write_jsonl(&files, "chats.jsonl");
    let config = TrainConfig {
        data: None,
        ..sft_config(data.clone(), files.0.join("out"))
    };
    match Trainer::new(gpu(), config, &mut Quiet) {
        Err(Error::Config { field, message }) => {
            assert_eq!(field, "data");
            assert!(message.contains("conversations"), "{message}");
        }
        other => panic!("expected a config error, got {:?}", other.err()),
    }
    let config = TrainConfig {
        task: Task::Es2,
        ..sft_config(data.clone(), files.0.join("out"))
    };
    let field = match Trainer::new(gpu(), config, &mut Quiet) {
        Err(Error::Config { field, .. }) => field,
        other => panic!("expected a config error, got {:?}", other.err()),
    };
    assert_eq!(field, "data");
    let config = TrainConfig {
        harmful: Some(data.clone()),
        ..sft_config(data, files.0.join("out"))
    };
    let field = match Trainer::new(gpu(), config, &mut Quiet) {
        Err(Error::Config { field, .. }) => field,
        other => panic!("expected a config error, got {:?}", other.err()),
    };
    assert_eq!(field, "harmful");
}

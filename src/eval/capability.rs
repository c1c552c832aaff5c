//! What a model can still do: KL(base ‖ model) of the next-token distributions on held-out
//! harmless prompts, perplexity on a text file, and multiple-choice accuracy by
//! log-likelihood on an MMLU-format CSV (question, four choices, answer).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::heldout::heldout_kl;
use super::loss::{sequence_losses, Scored, SequenceLoss};
use super::report::Scored as ScoredFile;
use super::subject::Subject;
use crate::gpu::Gpu;
use crate::model::Output;
use crate::ops::kl::KlOptions;
use crate::{Error, Result};

/// Sequences per pass for the capability measurements.
const BATCH: usize = 4;

/// The files capability is measured on (each optional).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CapabilityFiles {
    /// Plain text whose perplexity is measured.
    pub perplexity: Option<PathBuf>,
    /// Tokens per window of the perplexity (`None`: the model's context, at most 512).
    pub window: Option<usize>,
    /// An MMLU-format CSV.
    pub multiple_choice: Option<PathBuf>,
    /// Questions of it used at most (`None`: all).
    pub questions: Option<usize>,
}

/// KL(base ‖ model) per real token of `prompts`, at temperature 1.
pub fn kl_to(gpu: &Gpu, base: &Subject, model: &Subject, prompts: &[Vec<u32>]) -> Result<f64> {
    let batches = model.batches(gpu, prompts, BATCH)?;
    heldout_kl(
        gpu,
        (
            model.model,
            model.pass(Output::Hidden(model.model.layers())),
        ),
        (base.model, base.pass(Output::Hidden(base.model.layers()))),
        &batches,
        &KlOptions::default(),
    )
}

/// The perplexity of `files.perplexity`, if given: the text tokenised whole, cut into windows
/// that are scored independently (every token but each window's first).
pub fn perplexity(
    gpu: &Gpu,
    subject: &Subject,
    files: &CapabilityFiles,
) -> Result<Option<ScoredFile>> {
    let Some(path) = &files.perplexity else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let ids = subject.tokenizer.encode(&text)?;
    if ids.len() < 2 {
        return Err(Error::format(
            path,
            "the text has fewer than 2 tokens: nothing to predict",
        ));
    }
    let context = subject.model.config.max_position_embeddings;
    let window = files.window.unwrap_or(512).clamp(2, context);
    let items: Vec<Scored> = ids
        .chunks(window)
        .filter(|w| w.len() >= 2)
        .map(|w| Scored::continuation(&w[..1], &w[1..]))
        .collect();
    let loss = SequenceLoss::sum(&sequence_losses(gpu, subject, &items, &[], BATCH)?);
    Ok(Some(ScoredFile {
        file: path.display().to_string(),
        value: loss.mean().exp(),
        count: loss.tokens,
    }))
}

/// One multiple-choice question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// The question's text.
    pub question: String,
    /// The four choices, A to D.
    pub choices: [String; 4],
    /// 0..4.
    pub answer: usize,
}

const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

impl Question {
    /// The prompt the choices are scored after (lm-evaluation-harness's MMLU format).
    pub fn context(&self) -> String {
        let mut text = format!("Question: {}\n", self.question.trim());
        for (letter, choice) in LETTERS.iter().zip(&self.choices) {
            text += &format!("{letter}. {}\n", choice.trim());
        }
        text + "Answer:"
    }
}

/// Reads an MMLU-format CSV: rows of question, four choices and the answer (a letter A–D or
/// an index 0–3), with or without a header row.
pub fn read_questions(path: &Path) -> Result<Vec<Question>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(text.as_bytes());
    let mut questions = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| Error::format(path, format!("row {}: {e}", i + 1)))?;
        if record.len() != 6 {
            return Err(Error::format(
                path,
                format!(
                    "row {}: {} columns; expected 6 (question, A, B, C, D, answer)",
                    i + 1,
                    record.len()
                ),
            ));
        }
        let answer = match record[5].trim() {
            "A" | "a" | "0" => 0,
            "B" | "b" | "1" => 1,
            "C" | "c" | "2" => 2,
            "D" | "d" | "3" => 3,
            // The first row may be a header.
            _ if i == 0 => continue,
            other => {
                return Err(Error::format(
                    path,
                    format!("row {}: the answer {other:?} is not A–D or 0–3", i + 1),
                ))
            }
        };
        questions.push(Question {
            question: record[0].to_owned(),
            choices: std::array::from_fn(|c| record[c + 1].to_owned()),
            answer,
        });
    }
    if questions.is_empty() {
        return Err(Error::format(path, "no questions"));
    }
    Ok(questions)
}

/// The continuation ids of `context + continuation`: the tokens after the longest prefix the
/// two encodings share (as lm-evaluation-harness splits them).
fn split_continuation(subject: &Subject, context: &str, continuation: &str) -> Result<Scored> {
    let whole = subject
        .tokenizer
        .encode(&format!("{context}{continuation}"))?;
    let prefix = subject.tokenizer.encode(context)?;
    let shared = whole
        .iter()
        .zip(&prefix)
        .take_while(|(a, b)| a == b)
        .count()
        .min(whole.len().saturating_sub(1))
        .max(1);
    Ok(Scored::continuation(&whole[..shared], &whole[shared..]))
}

/// The accuracy on `files.multiple_choice`, if given: each question's answer is the choice
/// letter (" A" … " D") with the highest log-likelihood after the question.
pub fn multiple_choice(
    gpu: &Gpu,
    subject: &Subject,
    files: &CapabilityFiles,
) -> Result<Option<ScoredFile>> {
    let Some(path) = &files.multiple_choice else {
        return Ok(None);
    };
    let mut questions = read_questions(path)?;
    questions.truncate(files.questions.unwrap_or(usize::MAX));
    let mut right = 0;
    for q in &questions {
        let context = q.context();
        let items = LETTERS
            .iter()
            .map(|l| split_continuation(subject, &context, &format!(" {l}")))
            .collect::<Result<Vec<_>>>()?;
        let losses = sequence_losses(gpu, subject, &items, &[], BATCH)?;
        let chosen = losses
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.total.total_cmp(&b.1.total))
            .map_or(0, |(i, _)| i);
        right += usize::from(chosen == q.answer);
    }
    Ok(Some(ScoredFile {
        file: path.display().to_string(),
        value: right as f64 / questions.len() as f64,
        count: questions.len(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("es2-mc-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn mmlu_csv_with_or_without_a_header_and_named_errors() {
        let rows = "\"What is 2+2, really?\",3,4,5,6,B\nSky colour,red,green,blue,grey,2\n";
        let plain = read_questions(&write("plain.csv", rows)).unwrap();
        assert_eq!(plain.len(), 2);
        assert_eq!(plain[0].question, "What is 2+2, really?");
        assert_eq!((plain[0].answer, plain[1].answer), (1, 2));
        assert_eq!(plain[1].choices[2], "blue");
        let headed = format!("question,A,B,C,D,answer\n{rows}");
        assert_eq!(
            read_questions(&write("headed.csv", &headed)).unwrap(),
            plain
        );
        assert_eq!(
            plain[0].context(),
            "Question: What is 2+2, really?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
        );
        let bad = write("bad.csv", "q,a,b,c,d,A\nq,a,b,c,d,E\n");
        let err = read_questions(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.csv") && err.contains("row 2"), "{err}");
        let short = write("short.csv", "q,a,b,A\n");
        let err = read_questions(&short).unwrap_err().to_string();
        assert!(err.contains("row 1: 4 columns"), "{err}");
    }
}

//! What one model's hidden states say about harmful and harmless prompts, layer by layer: the
//! pooled embeddings of the probe prompts at every hidden state, and from them the geometry,
//! a probe fitted on the model's own embeddings (with its held-out accuracy), and the
//! mean-difference direction that steering and ablation use.

use super::geometry::{centroid, mean_norm, LayerGeometry};
use super::probe::{Probe, ProbeOptions};
use super::prompts::Drawn;
use super::report::LayerRow;
use super::subject::Subject;
use super::Rows;
use crate::gpu::Gpu;
use crate::ops::pool::Pool;
use crate::Result;

/// Prompts per pass when embedding prompts.
pub const EMBED_BATCH: usize = 16;

/// The pooled embeddings of the probe prompts at every hidden state (0..=L), fit rows first.
#[derive(Debug, Clone)]
pub struct Embeddings {
    /// Values per embedding (the hidden size C).
    pub cols: usize,
    /// Per hidden-state index, the harmful rows `[n·C]`.
    pub harmful: Vec<Vec<f64>>,
    /// Per hidden-state index, the harmless rows `[n·C]`.
    pub harmless: Vec<Vec<f64>>,
    /// How many of the harmful rows (the first ones) fit the probes; the rest test them.
    pub harmful_fit: usize,
    /// How many of the harmless rows (the first ones) fit the probes; the rest test them.
    pub harmless_fit: usize,
}

impl Embeddings {
    /// Embeds the probe prompts of both sides under `subject`, pooled with `pool`.
    pub fn measure(
        gpu: &Gpu,
        subject: &Subject,
        harmful: &Drawn,
        harmless: &Drawn,
        pool: Pool,
    ) -> Result<Embeddings> {
        let hidden: Vec<usize> = (0..=subject.layers()).collect();
        let embed = |prompts: &[String]| -> Result<Vec<Vec<f64>>> {
            let ids = subject.encode_all(prompts)?;
            let batches = subject.batches(gpu, &ids, EMBED_BATCH)?;
            subject.pooled(gpu, &batches, &hidden, pool)
        };
        Ok(Embeddings {
            cols: subject.width(),
            harmful: embed(&harmful.probe())?,
            harmless: embed(&harmless.probe())?,
            harmful_fit: harmful.probe_fit.len(),
            harmless_fit: harmless.probe_fit.len(),
        })
    }

    /// Hidden-state indices, 0..=L.
    pub fn hidden_states(&self) -> std::ops::Range<usize> {
        0..self.harmful.len()
    }

    fn rows<'a>(&self, data: &'a [f64], range: std::ops::Range<usize>) -> Rows<'a> {
        Rows::new(
            &data[range.start * self.cols..range.end * self.cols],
            self.cols,
        )
        .expect("embeddings are whole rows")
    }

    fn count(&self, data: &[f64]) -> usize {
        data.len() / self.cols
    }

    /// (harmful, harmless) rows of hidden state `i`: all of them.
    pub fn all(&self, i: usize) -> (Rows<'_>, Rows<'_>) {
        let (h, s) = (&self.harmful[i], &self.harmless[i]);
        (
            self.rows(h, 0..self.count(h)),
            self.rows(s, 0..self.count(s)),
        )
    }

    /// The rows that fit the probe.
    pub fn fit(&self, i: usize) -> (Rows<'_>, Rows<'_>) {
        (
            self.rows(&self.harmful[i], 0..self.harmful_fit),
            self.rows(&self.harmless[i], 0..self.harmless_fit),
        )
    }

    /// The rows that test it.
    pub fn test(&self, i: usize) -> (Rows<'_>, Rows<'_>) {
        let (h, s) = (&self.harmful[i], &self.harmless[i]);
        (
            self.rows(h, self.harmful_fit..self.count(h)),
            self.rows(s, self.harmless_fit..self.count(s)),
        )
    }

    /// ν per hidden state: the mean norm of the harmless embeddings.
    pub fn harmless_norms(&self) -> Vec<f64> {
        self.hidden_states()
            .map(|i| mean_norm(self.all(i).1))
            .collect()
    }
}

/// One hidden state's findings.
#[derive(Debug, Clone)]
pub struct LayerFindings {
    /// The hidden-state index.
    pub layer: usize,
    /// Centroid and pairwise distances, raw and normalised.
    pub geometry: LayerGeometry,
    /// Fitted on the fit rows.
    pub probe: Probe,
    /// On the test rows (`None` when a side has no test rows).
    pub probe_accuracy: Option<f64>,
    /// mean(harmful) − mean(harmless) over every probe prompt, raw (refusal_direction's
    /// direction; steering uses its negative).
    pub difference: Vec<f64>,
}

impl LayerFindings {
    /// The row of the report.
    pub fn row(&self) -> LayerRow {
        LayerRow {
            layer: self.layer,
            geometry: self.geometry.clone(),
            probe_accuracy: self.probe_accuracy,
        }
    }
}

/// Per hidden state: geometry normalised by `nu` (the base model's harmless norms, as
/// training normalises), a probe and its held-out accuracy, and the mean difference.
pub fn analyse(
    embeddings: &Embeddings,
    nu: &[f64],
    options: &ProbeOptions,
) -> Result<Vec<LayerFindings>> {
    embeddings
        .hidden_states()
        .map(|layer| {
            let (harmful, harmless) = embeddings.all(layer);
            // A hidden state with no spread (the input embedding of the same last token) has
            // ν = 0; it is measured against 1 instead.
            let nu = Some(nu[layer]).filter(|v| *v > 0.0).unwrap_or(1.0);
            let geometry = LayerGeometry::measure(harmful, harmless, nu)?;
            let (fit_h, fit_s) = embeddings.fit(layer);
            let probe = Probe::fit(fit_h, fit_s, options)?;
            let (test_h, test_s) = embeddings.test(layer);
            let probe_accuracy =
                (!test_h.is_empty() && !test_s.is_empty()).then(|| probe.accuracy(test_h, test_s));
            let difference = centroid(harmful)
                .iter()
                .zip(centroid(harmless))
                .map(|(h, s)| h - s)
                .collect();
            Ok(LayerFindings {
                layer,
                geometry,
                probe,
                probe_accuracy,
                difference,
            })
        })
        .collect()
}

//! Dataset statistics under an encoder: what `lorasft data stats` prints and reports quote.

use serde::{Deserialize, Serialize};

use crate::data::batching::{Batching, PlanTokens, Planner};
use crate::data::encode::{Encoder, Example};
use crate::data::formats::Sample;
use crate::error::Result;

/// Percentiles of a length distribution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lengths {
    /// Smallest.
    pub min: usize,
    /// 50th percentile (nearest rank).
    pub p50: usize,
    /// 90th percentile.
    pub p90: usize,
    /// 99th percentile.
    pub p99: usize,
    /// Largest.
    pub max: usize,
    /// Mean.
    pub mean: f64,
}

impl Lengths {
    /// Nearest-rank percentiles of `values` (all zeros when empty).
    pub fn of(values: &[usize]) -> Self {
        let mut v = values.to_vec();
        v.sort_unstable();
        let pct = |p: f64| -> usize {
            if v.is_empty() {
                return 0;
            }
            let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
            v[rank.min(v.len()) - 1]
        };
        let mean = if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<usize>() as f64 / v.len() as f64
        };
        Self {
            min: pct(0.0),
            p50: pct(50.0),
            p90: pct(90.0),
            p99: pct(99.0),
            max: v.last().copied().unwrap_or(0),
            mean,
        }
    }
}

/// What a dataset looks like once encoded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataStats {
    /// Records in the file.
    pub records: usize,
    /// Records with a non-blank input.
    pub with_input: usize,
    /// Conversations skipped because the label policy trains none of their turns (counted
    /// here and in the report, never dropped silently).
    #[serde(default)]
    pub skipped_no_trained_turn: usize,
    /// Trailing messages cut from conversations to fit `max_len`, over all conversations.
    #[serde(default)]
    pub turns_cut: usize,
    /// Records without one.
    pub without_input: usize,
    /// Records whose output is empty.
    pub empty_output: usize,
    /// Characters of the formatted text (prompt + response).
    pub chars: Lengths,
    /// Tokens before truncation (BOS and EOS included as configured).
    pub tokens: Lengths,
    /// Records longer than max length (cut by truncation).
    pub truncated: usize,
    /// Records whose response was cut entirely by truncation.
    pub response_truncated_away: usize,
    /// Records with no loss target at all under the label policy.
    pub no_trainable_label: usize,
    /// Loss targets over the dataset under the policy and padding (batches in file order).
    pub label_tokens: usize,
    /// Of those, targets that sit on padding.
    pub padding_label_tokens: usize,
    /// Padded tokens over all batches (the compute spent).
    pub padded_tokens: usize,
    /// Real tokens over all batches.
    pub real_tokens: usize,
    /// Rows, micro-batches and padding under each batching mode (file order, one epoch).
    #[serde(default)]
    pub batching: Vec<BatchingStats>,
}

/// One epoch of a dataset under one batching mode, planned in file order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchingStats {
    /// The mode.
    pub mode: Batching,
    /// Rows (one per example unless packed).
    pub rows: usize,
    /// Micro-batches of `batch_size` rows.
    pub micro_batches: usize,
    /// Token slots the rows take, padding included (the compute spent).
    pub padded_tokens: usize,
    /// Real tokens among them.
    pub real_tokens: usize,
}

impl BatchingStats {
    /// Share of the compute spent on padding.
    pub fn padding_share(&self) -> f64 {
        if self.padded_tokens == 0 {
            0.0
        } else {
            1.0 - self.real_tokens as f64 / self.padded_tokens as f64
        }
    }

    /// Optimizer steps per epoch with `grad_accum` micro-batches per step (as training counts
    /// them: at least one).
    pub fn steps_per_epoch(&self, grad_accum: usize) -> usize {
        (self.micro_batches / grad_accum.max(1)).max(1)
    }
}

/// Each batching mode's rows, micro-batches and padding over `examples` in file order, with
/// rows padded as `encoder`'s padding mode says.
pub fn batching_stats(
    examples: &[Example],
    encoder: &Encoder,
    batch_size: usize,
) -> Vec<BatchingStats> {
    let lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
    let max_len = encoder.config().max_len;
    Batching::ALL
        .iter()
        .map(|&mode| {
            let plan = Planner::new(mode, lengths.clone(), max_len, batch_size, 0, false).epoch(0);
            let t = PlanTokens::of(&plan, &lengths, encoder);
            BatchingStats {
                mode,
                rows: t.rows,
                micro_batches: plan.len(),
                padded_tokens: t.slots,
                real_tokens: t.real,
            }
        })
        .collect()
}

impl DataStats {
    /// Share of loss targets that are padding.
    pub fn padding_label_share(&self) -> f64 {
        if self.label_tokens == 0 {
            0.0
        } else {
            self.padding_label_tokens as f64 / self.label_tokens as f64
        }
    }
}

/// Whether a sample's answer is empty: an Alpaca output, or every assistant message's text.
fn empty_output(s: &Sample) -> bool {
    match s {
        Sample::Instruction(r) => r.output.is_empty(),
        Sample::Chat(c) => c
            .messages
            .iter()
            .filter(|m| m.role == crate::chat::Role::Assistant)
            .all(|m| m.content_str().is_empty() && m.tool_calls.is_none()),
    }
}

/// Whether an example has no trained turn under an assistant policy (a conversation the
/// run skips and counts).
pub fn has_no_trained_turn(e: &Example) -> bool {
    e.trained.as_ref().is_some_and(|t| t.is_empty())
}

/// Encodes every record and collates batches of `batch_size` in file order. Conversations
/// with no trained turn are left out of the returned examples and counted.
pub fn compute(
    records: &[Sample],
    encoder: &Encoder,
    batch_size: usize,
) -> Result<(DataStats, Vec<Example>)> {
    compute_with(records, encoder, batch_size, |_, e| e)
}

/// [`compute`] with a function that places an encoding error (record index, error).
pub fn compute_with(
    records: &[Sample],
    encoder: &Encoder,
    batch_size: usize,
    locate: impl Fn(usize, crate::error::Error) -> crate::error::Error,
) -> Result<(DataStats, Vec<Example>)> {
    let mut examples = records
        .iter()
        .enumerate()
        .map(|(i, r)| encoder.encode(r).map_err(|e| locate(i, e)))
        .collect::<Result<Vec<_>>>()?;
    let skipped = examples.iter().filter(|e| has_no_trained_turn(e)).count();
    let turns_cut = examples.iter().map(|e| e.turns_cut).sum();
    examples.retain(|e| !has_no_trained_turn(e));
    let chars: Vec<usize> = records
        .iter()
        .map(|r| encoder.text(r).map(|t| t.chars().count()))
        .collect::<Result<Vec<_>>>()?;
    let max_len = encoder.config().max_len;
    let mut s = DataStats {
        records: records.len(),
        with_input: records.iter().filter(|r| r.has_input()).count(),
        skipped_no_trained_turn: skipped,
        turns_cut,
        without_input: records.iter().filter(|r| !r.has_input()).count(),
        empty_output: records.iter().filter(|r| empty_output(r)).count(),
        chars: Lengths::of(&chars),
        tokens: Lengths::of(&examples.iter().map(|e| e.full_len).collect::<Vec<_>>()),
        truncated: examples.iter().filter(|e| e.truncated()).count(),
        response_truncated_away: examples
            .iter()
            .filter(|e| e.prompt_tokens >= max_len && e.full_len > e.prompt_tokens)
            .count(),
        no_trainable_label: 0,
        label_tokens: 0,
        padding_label_tokens: 0,
        padded_tokens: 0,
        real_tokens: 0,
        batching: Vec::new(),
    };
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        for row in encoder.collate(&refs) {
            let t = row.targets();
            s.no_trainable_label += usize::from(t == 0);
            s.label_tokens += t;
            s.padding_label_tokens += row.padding_targets();
            s.padded_tokens += row.input_ids.len();
            s.real_tokens += row.attention_mask.iter().filter(|&&m| m == 1).count();
        }
    }
    s.batching = batching_stats(&examples, encoder, batch_size);
    Ok((s, examples))
}

/// The text `lorasft data stats` prints.
pub fn render(
    s: &DataStats,
    enc: &Encoder,
    data: &std::path::Path,
    tokenizer: &std::path::Path,
    grad_accum: usize,
) -> String {
    let c = enc.config();
    let l = |x: &Lengths| {
        format!(
            "min {} / p50 {} / p90 {} / p99 {} / max {} (mean {:.1})",
            x.min, x.p50, x.p90, x.p99, x.max, x.mean
        )
    };
    let pct = |a: usize, b: usize| {
        if b == 0 {
            0.0
        } else {
            100.0 * a as f64 / b as f64
        }
    };
    format!(
        "data: {}\ntokenizer: {}\nencoding: max length {}, padding {:?} ({:?} side), labels {:?}, EOS {:?}\n\
         records: {} ({} with input, {} without; {} with empty output)\n\
         characters per record: {}\ntokens per record (untruncated): {}\n\
         records truncated at {}: {} ({:.1}%), response cut entirely: {}\n\
         records with no trainable label: {}\n\
         loss targets: {}, of which padding: {} ({:.2}%)\n\
         padded tokens: {}, real: {} ({:.1}% of compute on padding)\n{}",
        data.display(),
        tokenizer.display(),
        c.max_len,
        c.padding,
        c.padding_side,
        c.labels,
        c.eos,
        s.records,
        s.with_input,
        s.without_input,
        s.empty_output,
        l(&s.chars),
        l(&s.tokens),
        c.max_len,
        s.truncated,
        pct(s.truncated, s.records),
        s.response_truncated_away,
        s.no_trainable_label,
        s.label_tokens,
        s.padding_label_tokens,
        100.0 * s.padding_label_share(),
        s.padded_tokens,
        s.real_tokens,
        pct(s.padded_tokens - s.real_tokens, s.padded_tokens),
        render_batching(&s.batching, c.batching, grad_accum),
    )
}

/// The per-mode table of `lorasft data stats`: rows, micro-batches and padding share.
fn render_batching(modes: &[BatchingStats], chosen: Batching, grad_accum: usize) -> String {
    let mut out = format!(
        "batching (file order, one epoch; steps at grad accum {grad_accum}): mode | rows | micro-batches | steps | padded tokens | real | padding share\n",
    );
    for m in modes {
        out.push_str(&format!(
            "  {}{} | {} | {} | {} | {} | {} | {:.1}%\n",
            m.mode.name(),
            if m.mode == chosen { " (chosen)" } else { "" },
            m.rows,
            m.micro_batches,
            m.steps_per_epoch(grad_accum),
            m.padded_tokens,
            m.real_tokens,
            100.0 * m.padding_share()
        ));
    }
    out
}

//! Progress on stderr wherever lorasft runs. A bar redrawn in place helps only a person at a
//! terminal; under a redirect, nohup, Slurm or CI it draws nothing, and a long run would show
//! no sign of life. So the command line picks one [`Mode`] once (from whether stderr is a
//! terminal, `--quiet` and `--log-format`) and hands it down, and every long piece of work
//! reports through it: training through [`Steps`], the rest (GGUF import and export, dataset
//! encoding, evaluation) through [`Task`].
//!
//! Lines go to stderr, so stdout keeps only a command's result. Text lines never carry colour;
//! the terminal bar drops its colour when `NO_COLOR` is set. JSON lines are one object per
//! line with an `event` key; docs/training.md lists their fields.

use std::ffi::OsStr;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use serde_json::json;

/// Whether the terminal bar may use colour (<https://no-color.org>).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colour {
    /// Colour allowed.
    On,
    /// `NO_COLOR` is set (to anything but the empty string).
    Off,
}

impl Colour {
    /// The choice a `NO_COLOR` value makes: any non-empty value turns colour off.
    pub fn from_no_color(value: Option<&OsStr>) -> Colour {
        match value {
            Some(v) if !v.is_empty() => Colour::Off,
            _ => Colour::On,
        }
    }

    /// The choice of this process's environment.
    pub fn from_env() -> Colour {
        Colour::from_no_color(std::env::var_os("NO_COLOR").as_deref())
    }
}

/// The format of progress lines asked for with `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Plain text lines, one per report.
    Text,
    /// JSON lines: one object per report (schema in docs/training.md).
    Json,
}

/// How long-running work shows its progress on stderr. Chosen once by the command line and
/// passed down; library callers that show nothing use the default, [`Mode::Quiet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// An indicatif bar redrawn in place (stderr is a terminal).
    Bar(Colour),
    /// Plain text lines at a bounded rate.
    Text,
    /// JSON lines at a bounded rate.
    Json,
    /// No progress at all (`--quiet`); messages that are not progress still print.
    #[default]
    Quiet,
}

impl Mode {
    /// The mode for a request: `--quiet` wins, an explicit `--log-format` gives lines even on
    /// a terminal, and without one a terminal gets the bar and anything else text lines.
    pub fn choose(quiet: bool, format: Option<LogFormat>, terminal: bool, colour: Colour) -> Mode {
        match (quiet, format, terminal) {
            (true, _, _) => Mode::Quiet,
            (false, Some(LogFormat::Json), _) => Mode::Json,
            (false, Some(LogFormat::Text), _) | (false, None, false) => Mode::Text,
            (false, None, true) => Mode::Bar(colour),
        }
    }

    /// [`Mode::choose`] for this process's stderr and `NO_COLOR`.
    pub fn for_stderr(quiet: bool, format: Option<LogFormat>) -> Mode {
        Mode::choose(
            quiet,
            format,
            std::io::stderr().is_terminal(),
            Colour::from_env(),
        )
    }

    /// `text` as this mode prints a message that is not progress (a warning, a summary):
    /// a JSON `message` event in JSON mode, else the text itself.
    pub fn message_line(self, text: &str) -> String {
        match self {
            Mode::Json => json!({"event": "message", "text": text}).to_string(),
            _ => text.to_string(),
        }
    }

    /// Prints a message that is not progress on stderr, in every mode (see
    /// [`Mode::message_line`]).
    pub fn message(self, text: &str) {
        emit(&self.message_line(text));
    }

    /// Starts reporting `total` units of `what` (e.g. `import-gguf`, `tensors`): in text and
    /// JSON modes the first line is printed now.
    pub fn task(self, what: &str, total: u64, unit: &'static str) -> Task {
        Task::new(self, what, total, unit)
    }
}

/// Writes one line to stderr. A closed or broken stderr must not stop a training run, so a
/// failed write is dropped.
fn emit(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// Seconds as `MM:SS`, or `H:MM:SS` from an hour on; `?` when unknown (negative, not finite).
pub fn clock(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "?".into();
    }
    let s = seconds as u64;
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    if h > 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{m:02}:{s:02}")
    }
}

/// Seconds left for `remaining` units at the pace of `done` units in `elapsed` seconds;
/// unknown before the first unit is done.
pub fn eta(elapsed: f64, done: u64, remaining: u64) -> Option<f64> {
    (done > 0 && elapsed.is_finite()).then(|| elapsed / done as f64 * remaining as f64)
}

/// The `eta` field of a text line.
fn eta_text(eta: Option<f64>) -> String {
    eta.map_or_else(|| "?".into(), clock)
}

/// When a task prints its next line: at the start and the end, and in between only after at
/// least [`Pace::MIN_GAP`] and either a tenth of the work or [`Pace::MAX_GAP`] since the last
/// line. A task prints at most a dozen lines plus one per `MAX_GAP`, however fast or slow.
#[derive(Debug, Clone)]
pub struct Pace {
    last_done: u64,
    last_at: Duration,
}

impl Pace {
    /// The least time between two lines of a task (its end line aside).
    pub const MIN_GAP: Duration = Duration::from_secs(1);
    /// The most time between two lines of a task that still moves.
    pub const MAX_GAP: Duration = Duration::from_secs(30);

    /// A pace whose start line was printed at `now` (time since the task started).
    pub fn start(now: Duration) -> Pace {
        Pace {
            last_done: 0,
            last_at: now,
        }
    }

    /// Whether a line is due with `done` of `total` units done at `now`; when it is, it counts
    /// as printed.
    pub fn due(&mut self, done: u64, total: u64, now: Duration) -> bool {
        let gap = now.saturating_sub(self.last_at);
        let tenth = (total / 10).max(1);
        let due = done >= total
            || (gap >= Pace::MIN_GAP
                && (done.saturating_sub(self.last_done) >= tenth || gap >= Pace::MAX_GAP));
        if due {
            self.last_done = done;
            self.last_at = now;
        }
        due
    }
}

/// A bar on stderr of `total` units in the given template.
fn bar(total: u64, template: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// The bar's fill, coloured unless `NO_COLOR` said otherwise.
fn fill(colour: Colour) -> &'static str {
    match colour {
        Colour::On => "{bar:30.cyan/blue}",
        Colour::Off => "{bar:30}",
    }
}

/// Progress of one piece of work counted in units (tensors, records, batches).
pub struct Task {
    mode: Mode,
    what: String,
    unit: &'static str,
    total: u64,
    done: u64,
    start: Instant,
    pace: Pace,
    bar: Option<indicatif::ProgressBar>,
}

impl Task {
    fn new(mode: Mode, what: &str, total: u64, unit: &'static str) -> Task {
        let bar = match mode {
            Mode::Bar(colour) => Some(bar(
                total,
                &format!(
                    "{{prefix}} {} {{pos}}/{{len}} {unit} [{{elapsed_precise}}<{{eta_precise}}]",
                    fill(colour)
                ),
            )),
            _ => None,
        };
        if let Some(b) = &bar {
            b.set_prefix(what.to_string());
        }
        let task = Task {
            mode,
            what: what.to_string(),
            unit,
            total,
            done: 0,
            start: Instant::now(),
            pace: Pace::start(Duration::ZERO),
            bar,
        };
        task.line();
        task
    }

    /// Counts `n` more units done; prints a line when one is due (see [`Pace`]).
    pub fn advance(&mut self, n: u64) {
        self.done = (self.done + n).min(self.total);
        if let Some(b) = &self.bar {
            b.set_position(self.done);
        } else if self.pace.due(self.done, self.total, self.start.elapsed()) {
            self.line();
        }
    }

    /// Ends the task: the bar is cleared (the lines already said where it ended).
    pub fn finish(self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }

    /// Prints the line of where the task stands (text and JSON modes).
    fn line(&self) {
        let elapsed = self.start.elapsed().as_secs_f64();
        let eta = eta(elapsed, self.done, self.total - self.done);
        match self.mode {
            Mode::Text => emit(&task_text(
                &self.what, self.done, self.total, self.unit, elapsed, eta,
            )),
            Mode::Json => emit(
                &json!({
                    "event": "progress",
                    "task": self.what,
                    "done": self.done,
                    "total": self.total,
                    "unit": self.unit,
                    "elapsed_s": elapsed,
                    "eta_s": eta,
                })
                .to_string(),
            ),
            Mode::Bar(_) | Mode::Quiet => {}
        }
    }
}

/// A task's text line: `import-gguf: 136/272 tensors (50%) | elapsed 00:02 | eta 00:02`; the
/// start line is only `import-gguf: 0/272 tensors`, and the end line has no eta.
pub fn task_text(
    what: &str,
    done: u64,
    total: u64,
    unit: &str,
    elapsed: f64,
    eta: Option<f64>,
) -> String {
    let head = format!("{what}: {done}/{total} {unit}");
    if done == 0 {
        return head;
    }
    let pct = 100 * done / total.max(1);
    let mut line = format!("{head} ({pct}%) | elapsed {}", clock(elapsed));
    if done < total {
        line.push_str(&format!(" | eta {}", eta_text(eta)));
    }
    line
}

/// What a training step measured, as its progress line shows it.
#[derive(Debug, Clone, Copy)]
pub struct StepLine {
    /// Optimizer steps done.
    pub step: usize,
    /// Mean loss per target token.
    pub loss: f64,
    /// Learning rate of the update.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Real (non-padding) tokens per second since this process started the run.
    pub tokens_per_s: f64,
    /// Seconds since this process started the run.
    pub elapsed_s: f64,
}

/// Progress of a training run: the bar on a terminal (moved every step), else a line for each
/// logged step and each evaluation.
pub struct Steps {
    mode: Mode,
    total: usize,
    /// The step this process started from (a resumed run's ETA counts its own steps only).
    first: usize,
    bar: Option<indicatif::ProgressBar>,
}

impl Steps {
    /// Progress of a run of `total` steps that starts (or resumes) at step `position`.
    pub fn new(mode: Mode, total: usize, position: usize) -> Steps {
        let bar = match mode {
            Mode::Bar(colour) => {
                let template = format!(
                    "{} {{pos}}/{{len}} [{{elapsed_precise}}<{{eta_precise}}] {{msg}}",
                    fill(colour)
                );
                let b = bar(total as u64, &template);
                b.set_position(position as u64);
                Some(b)
            }
            _ => None,
        };
        Steps {
            mode,
            total,
            first: position,
            bar,
        }
    }

    /// Seconds left after `step`, at this process's pace so far.
    fn eta(&self, step: usize, elapsed: f64) -> Option<f64> {
        let done = step.saturating_sub(self.first) as u64;
        eta(elapsed, done, self.total.saturating_sub(step) as u64)
    }

    /// Moves the bar to `step` (a skipped step has no line of its own).
    pub fn set_position(&self, step: usize) {
        if let Some(b) = &self.bar {
            b.set_position(step as u64);
        }
    }

    /// Shows a trained step on the bar; lines come from [`Steps::log`].
    pub fn update(&self, s: &StepLine) {
        if let Some(b) = &self.bar {
            b.set_position(s.step as u64);
            b.set_message(format!(
                "loss {:.4} lr {:.2e} gn {:.3} {:.0} tok/s",
                s.loss, s.lr, s.grad_norm, s.tokens_per_s
            ));
        }
    }

    /// The line of a logged step (every `train.log_every` steps, the first and the last).
    pub fn log(&self, s: &StepLine) {
        let eta = self.eta(s.step, s.elapsed_s);
        match self.mode {
            Mode::Text => emit(&step_text(s, self.total, eta)),
            Mode::Json => emit(
                &json!({
                    "event": "train",
                    "step": s.step,
                    "total_steps": self.total,
                    "loss": s.loss,
                    "lr": s.lr,
                    "grad_norm": s.grad_norm,
                    "tokens_per_s": s.tokens_per_s,
                    "elapsed_s": s.elapsed_s,
                    "eta_s": eta,
                })
                .to_string(),
            ),
            Mode::Bar(_) | Mode::Quiet => {}
        }
    }

    /// The line of a validation loss at `step` (the bar prints it above itself).
    pub fn eval(&self, step: usize, loss: f64, elapsed_s: f64) {
        let eta = self.eta(step, elapsed_s);
        let text = eval_text(step, self.total, loss, elapsed_s, eta);
        match self.mode {
            Mode::Bar(_) => self.message(&text),
            Mode::Text => emit(&text),
            Mode::Json => emit(
                &json!({
                    "event": "eval",
                    "step": step,
                    "total_steps": self.total,
                    "loss": loss,
                    "ppl": loss.exp(),
                    "elapsed_s": elapsed_s,
                    "eta_s": eta,
                })
                .to_string(),
            ),
            Mode::Quiet => {}
        }
    }

    /// A message that is not progress (a skipped step, an interruption), in every mode: above
    /// the bar on a terminal.
    pub fn message(&self, text: &str) {
        match &self.bar {
            Some(b) => b.println(text),
            None => self.mode.message(text),
        }
    }

    /// Clears the bar at the end of the run.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// A logged step's text line:
/// `step 5/60 | loss 6.1234 | lr 1.00e-3 | grad norm 1.234 | 12438 tok/s | elapsed 00:01 | eta 00:09`.
pub fn step_text(s: &StepLine, total: usize, eta: Option<f64>) -> String {
    format!(
        "step {}/{total} | loss {:.4} | lr {:.2e} | grad norm {:.3} | {:.0} tok/s | elapsed {} | eta {}",
        s.step,
        s.loss,
        s.lr,
        s.grad_norm,
        s.tokens_per_s,
        clock(s.elapsed_s),
        eta_text(eta)
    )
}

/// An evaluation's text line: `step 20/60 | eval loss 5.3663 | ppl 214.09 | elapsed 00:01 | eta 00:02`.
pub fn eval_text(step: usize, total: usize, loss: f64, elapsed: f64, eta: Option<f64>) -> String {
    format!(
        "step {step}/{total} | eval loss {loss:.4} | ppl {:.2} | elapsed {} | eta {}",
        loss.exp(),
        clock(elapsed),
        eta_text(eta)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_wins_a_format_gives_lines_and_only_a_terminal_gets_the_bar() {
        let c = Colour::On;
        for terminal in [false, true] {
            for format in [None, Some(LogFormat::Text), Some(LogFormat::Json)] {
                assert_eq!(Mode::choose(true, format, terminal, c), Mode::Quiet);
            }
            let json = Mode::choose(false, Some(LogFormat::Json), terminal, c);
            assert_eq!(json, Mode::Json);
            let text = Mode::choose(false, Some(LogFormat::Text), terminal, c);
            assert_eq!(text, Mode::Text);
        }
        assert_eq!(Mode::choose(false, None, false, c), Mode::Text);
        assert_eq!(
            Mode::choose(false, None, true, Colour::Off),
            Mode::Bar(Colour::Off)
        );
    }

    #[test]
    fn no_color_set_to_anything_but_empty_turns_colour_off() {
        assert_eq!(Colour::from_no_color(None), Colour::On);
        assert_eq!(Colour::from_no_color(Some(OsStr::new(""))), Colour::On);
        assert_eq!(Colour::from_no_color(Some(OsStr::new("1"))), Colour::Off);
        assert_eq!(Colour::from_no_color(Some(OsStr::new("0"))), Colour::Off);
        assert!(!fill(Colour::Off).contains('.'), "no colour in the bar");
        assert!(fill(Colour::On).contains(".cyan"));
    }

    #[test]
    fn clock_shows_minutes_and_seconds_then_hours() {
        assert_eq!(clock(0.0), "00:00");
        assert_eq!(clock(59.9), "00:59");
        assert_eq!(clock(61.0), "01:01");
        assert_eq!(clock(3599.0), "59:59");
        assert_eq!(clock(3600.0), "1:00:00");
        assert_eq!(clock(36_000.0 + 62.0), "10:01:02");
        assert_eq!(clock(-1.0), "?");
        assert_eq!(clock(f64::NAN), "?");
        assert_eq!(clock(f64::INFINITY), "?");
    }

    #[test]
    fn eta_is_the_pace_so_far_times_what_remains() {
        assert_eq!(eta(10.0, 0, 50), None);
        assert_eq!(eta(10.0, 5, 45), Some(90.0));
        assert_eq!(eta(10.0, 60, 0), Some(0.0));
        assert_eq!(eta(f64::NAN, 3, 3), None);
        // A resumed run counts only the steps this process did.
        let s = Steps::new(Mode::Quiet, 60, 20);
        assert_eq!(s.eta(20, 5.0), None);
        assert_eq!(s.eta(30, 5.0), Some(15.0));
    }

    #[test]
    fn pace_prints_start_end_and_at_most_a_tenth_per_second_between() {
        let ms = Duration::from_millis;
        // Fast work: everything inside the first second, so only the end line is due.
        let mut p = Pace::start(ms(0));
        let lines: Vec<u64> = (1..=1000).filter(|&d| p.due(d, 1000, ms(d / 10))).collect();
        assert_eq!(lines, vec![1000]);
        // A unit per 100 ms over 100 s (1000 units): a line per tenth, then the end.
        let mut p = Pace::start(ms(0));
        let lines: Vec<u64> = (1..=1000)
            .filter(|&d| p.due(d, 1000, ms(d * 100)))
            .collect();
        assert_eq!(lines, (1..=10).map(|t| t * 100).collect::<Vec<_>>());
        // Slow work: a tenth takes 100 s, so a line comes every 30 s in between.
        let mut p = Pace::start(ms(0));
        let due: Vec<u64> = (1..=100)
            .filter(|&d| p.due(d, 100, ms(d * 10_000)))
            .take(5)
            .collect();
        assert_eq!(due, vec![3, 6, 9, 12, 15], "first lines: {due:?}");
        // Never two lines within MIN_GAP, except the end.
        let mut p = Pace::start(ms(0));
        assert!(!p.due(5, 10, ms(999)));
        assert!(p.due(5, 10, ms(1000)));
        assert!(!p.due(9, 10, ms(1500)));
        assert!(p.due(10, 10, ms(1501)));
    }

    #[test]
    fn lines_read_as_documented() {
        let s = StepLine {
            step: 5,
            loss: 6.12346,
            lr: 1e-3,
            grad_norm: 1.2344,
            tokens_per_s: 12437.6,
            elapsed_s: 1.5,
        };
        assert_eq!(
            step_text(&s, 60, Some(9.2)),
            "step 5/60 | loss 6.1235 | lr 1.00e-3 | grad norm 1.234 | 12438 tok/s | elapsed 00:01 | eta 00:09"
        );
        assert_eq!(
            eval_text(0, 60, 5.0, 0.2, None),
            "step 0/60 | eval loss 5.0000 | ppl 148.41 | elapsed 00:00 | eta ?"
        );
        assert_eq!(
            task_text("import-gguf", 0, 272, "tensors", 0.0, None),
            "import-gguf: 0/272 tensors"
        );
        assert_eq!(
            task_text("import-gguf", 136, 272, "tensors", 2.5, Some(2.5)),
            "import-gguf: 136/272 tensors (50%) | elapsed 00:02 | eta 00:02"
        );
        assert_eq!(
            task_text("import-gguf", 272, 272, "tensors", 4.0, Some(0.0)),
            "import-gguf: 272/272 tensors (100%) | elapsed 00:04"
        );
        assert_eq!(
            Mode::Json.message_line("a \"b\""),
            r#"{"event":"message","text":"a \"b\""}"#
        );
        assert_eq!(Mode::Text.message_line("plain"), "plain");
    }
}

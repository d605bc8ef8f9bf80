//! REPORT.md written from a run directory, in the shape of the reference "Day 2" report. Every
//! value comes from the run's files: `config.toml` and the typed records of
//! [`crate::records`] (manifest, data, checks, summary, metrics, generations), so every
//! sentence is a measured fact. The report never runs anything: the command that trains asks
//! for it once the run is done.

pub mod checks;
pub mod plot;
mod sections;

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::records::{RunRecords, files};
use crate::train::config::TrainConfig;

/// Everything the report reads from a run directory.
pub struct RunFiles {
    /// config.toml.
    pub cfg: TrainConfig,
    /// The run's records.
    pub records: RunRecords,
    /// Resumes that changed settings (resumes.json; none for most runs).
    pub resumes: Vec<crate::train::continuation::Resume>,
}

impl RunFiles {
    /// Reads a finished run directory.
    pub fn read(dir: &Path) -> Result<Self> {
        Ok(Self {
            cfg: TrainConfig::read(&dir.join(files::CONFIG))?,
            records: RunRecords::read(dir)?,
            resumes: crate::train::continuation::read(dir)?,
        })
    }
}

/// Writes REPORT.md, REPORT-loss.svg and REPORT-lr.svg into a finished run directory.
pub fn write(dir: &Path) -> Result<PathBuf> {
    write_to(dir, &dir.join("REPORT.md"), false)
}

/// Writes the report of `dir` to `out`, with its SVGs beside it (`<stem>-loss.svg`,
/// `<stem>-lr.svg`); `redact` hides volatile values (times, hosts, paths, throughput).
pub fn write_to(dir: &Path, out: &Path, redact: bool) -> Result<PathBuf> {
    let run = RunFiles::read(dir)?;
    let stem = out
        .file_stem()
        .map_or("REPORT".into(), |s| s.to_string_lossy().into_owned());
    let (loss_svg, lr_svg) = (format!("{stem}-loss.svg"), format!("{stem}-lr.svg"));
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Each file is renamed into place when complete (see `crate::output`).
    let (loss, lr) = (
        crate::output::Staged::file(&parent.join(&loss_svg))?,
        crate::output::Staged::file(&parent.join(&lr_svg))?,
    );
    plot_curves(&run, loss.path(), lr.path())?;
    loss.commit()?;
    lr.commit()?;
    let text = render(&run, &loss_svg, &lr_svg, redact);
    crate::output::write(out, text.as_bytes())?;
    Ok(out.to_path_buf())
}

/// The loss curves (train and validation) and the learning-rate schedule as SVGs.
fn plot_curves(run: &RunFiles, loss_svg: &Path, lr_svg: &Path) -> Result<()> {
    let metrics = &run.records.metrics;
    let points = |train: bool| -> Vec<(f64, f64)> {
        metrics
            .iter()
            .filter(|m| m.is_train() == train)
            .map(|m| (m.step as f64, m.loss))
            .collect()
    };
    let lr_pts: Vec<(f64, f64)> = metrics
        .iter()
        .filter_map(|m| m.lr.map(|lr| (m.step as f64, lr)))
        .collect();
    let series = |name: &str, points, (r, g, b)| plot::Series {
        name: name.into(),
        points,
        color: plotters::style::RGBColor(r, g, b),
    };
    plot::line_chart(
        loss_svg,
        "Loss",
        "optimizer step",
        "mean loss per target token",
        &[
            series("train", points(true), (31, 119, 180)),
            series("validation", points(false), (214, 39, 40)),
        ],
    )?;
    let schedule = format!("{:?}", run.cfg.optim.schedule).to_lowercase();
    plot::line_chart(
        lr_svg,
        "Learning rate",
        "optimizer step",
        "lr",
        &[series(&schedule, lr_pts, (44, 160, 44))],
    )
}

/// The markdown of the report (pure: everything comes from `run`).
pub fn render(run: &RunFiles, loss_svg: &str, lr_svg: &str, redact: bool) -> String {
    let ctx = sections::Ctx::new(run, redact);
    let mut r = String::new();
    sections::header(&ctx, &mut r);
    sections::model_and_method(&ctx, &mut r);
    sections::dataset(&ctx, &mut r);
    sections::tokenization(&ctx, &mut r);
    sections::training(&ctx, &mut r);
    sections::hardware(&ctx, &mut r);
    sections::verification(&ctx, &mut r);
    sections::results(&ctx, &mut r, loss_svg, lr_svg);
    sections::issues(&ctx, &mut r);
    sections::model_card(&ctx, &mut r);
    sections::conclusion(&ctx, &mut r);
    sections::reproduce(&ctx, &mut r);
    r
}

//! Training: the run's configuration, the optimizer and its schedule, the one optimizer step,
//! evaluation, checkpoints, and the run loop that ties them together.
//!
//! Inside, `config`, `optim`, `schedule` and `loss_scale` are plain parts; `step` uses them (and `exchange`, which moves a data-parallel step's gradients between ranks);
//! `eval`, `checkpoint` and `prepare` sit beside it; `run` drives all of them; `reproduce`
//! repeats a run.

pub mod checkpoint;
pub mod config;
pub mod continuation;
pub mod eval;
pub mod exchange;
pub mod loss_scale;
pub mod optim;
pub mod prepare;
pub mod reproduce;
pub mod run;
pub mod run_dir;
pub mod tensorboard;

pub mod schedule;
pub mod step;

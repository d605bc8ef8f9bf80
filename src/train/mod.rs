//! Training: loss, optimiser, schedules, configuration, checkpoints and the loop.

pub mod checkpoint;
pub mod config;
pub mod loss;
pub mod optim;
pub mod reproduce;
pub mod schedule;
pub mod trainer;

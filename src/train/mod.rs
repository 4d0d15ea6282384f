//! Training building blocks: the AdamW optimizer with 32-bit states, global gradient-norm
//! clipping, and learning-rate schedules. All of them follow PyTorch / transformers numerically
//! (checked against fixtures written by `scripts/fixtures_peft.py`); `optim8` is bitsandbytes'
//! 8-bit AdamW (`--optim paged_adamw_8bit`, checked against `scripts/fixtures_adam8.py`).

pub mod checkpoint;
pub mod config;
pub mod config_file;
pub mod data;
pub mod metrics;
pub mod optim;
pub mod optim8;
pub mod plan;
mod run;
pub mod schedule;
pub mod trainer;

pub use optim::{clip_grad_norm, grad_norm, AdamParamState, AdamW, AdamWState, OptimKind};
pub use schedule::{warmup_from_ratio, LrSchedule, ScheduleKind};

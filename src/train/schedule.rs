//! Learning-rate schedules with linear warmup, as transformers'
//! `get_{constant,linear,cosine}_schedule_with_warmup` and stepped as the HF Trainer steps them:
//! optimizer step `k` (0-based) uses `base_lr · λ(k)`.

use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// The decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    /// `get_constant_schedule_with_warmup` (HF `constant_with_warmup`; with 0 warmup steps also
    /// HF `constant`).
    Constant,
    /// `get_linear_schedule_with_warmup`: linear decay to 0 at `total_steps`.
    Linear,
    /// `get_cosine_schedule_with_warmup` with `num_cycles = 0.5`: half a cosine to 0 at
    /// `total_steps`.
    Cosine,
}

impl FromStr for ScheduleKind {
    type Err = Error;
    /// HF `lr_scheduler_type` names: `constant`, `constant_with_warmup`, `linear`, `cosine`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" | "constant_with_warmup" => Ok(ScheduleKind::Constant),
            "linear" => Ok(ScheduleKind::Linear),
            "cosine" => Ok(ScheduleKind::Cosine),
            _ => Err(Error::InvalidArg(format!(
                "unknown lr scheduler `{s}` (expected constant, linear or cosine)"
            ))),
        }
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ScheduleKind::Constant => "constant",
            ScheduleKind::Linear => "linear",
            ScheduleKind::Cosine => "cosine",
        })
    }
}

/// A learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl LrSchedule {
    /// The multiplier λ(step) of transformers' lr lambdas (Python float arithmetic, f64).
    pub fn lambda(&self, step: usize) -> f64 {
        let (k, w, n) = (step as f64, self.warmup_steps, self.total_steps);
        if step < w {
            return k / (w.max(1) as f64);
        }
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => {
                let num = n as f64 - k; // may be negative past the end, as in Python
                (num / (n.saturating_sub(w).max(1) as f64)).max(0.0)
            }
            ScheduleKind::Cosine => {
                let num_cycles = 0.5f64;
                let progress = (k - w as f64) / (n.saturating_sub(w).max(1) as f64);
                let f = 0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos());
                f.max(0.0)
            }
        }
    }

    /// The learning rate of optimizer step `step` (0-based): `base_lr · λ(step)`.
    pub fn lr_at(&self, step: usize) -> f64 {
        self.base_lr * self.lambda(step)
    }
}

/// Warmup steps from a ratio of the total, as transformers' `TrainingArguments.get_warmup_steps`
/// for a ratio in [0, 1): `ceil(ratio · total_steps)`. A ratio of exactly 1 means all steps.
pub fn warmup_from_ratio(ratio: f64, total_steps: usize) -> Result<usize> {
    if !(0.0..=1.0).contains(&ratio) {
        return Err(Error::InvalidArg(format!(
            "warmup ratio must be in [0, 1], got {ratio}"
        )));
    }
    Ok((total_steps as f64 * ratio).ceil() as usize)
}

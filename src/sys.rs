//! Process facts worth reporting: peak resident memory.

/// Peak resident set size of this process in bytes (`VmHWM` in `/proc/self/status`), when the
/// platform exposes it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes in MiB, for reports.
pub fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// `peak_rss_bytes` in MiB, for logs and reports (0 when unknown).
pub fn peak_rss_mib() -> f64 {
    peak_rss_bytes().map_or(0.0, |b| b as f64 / (1u64 << 20) as f64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn peak_rss_is_reported_on_linux() {
        if cfg!(target_os = "linux") {
            let b = super::peak_rss_bytes().expect("VmHWM on Linux");
            assert!(b > 1 << 20, "{b}");
        }
    }
}

//! The guide's `monitoring_rules.yaml`: four monitors, each a metric compared
//! with a threshold over a window, with a severity. The defaults are the
//! guide's; a tenant's configuration may override them (`monitoring_rules`,
//! in the guide's shape: a `byok_monitors` list).
//!
//! The windows are kept in shared memory by the key broker
//! ([`crate::counters`]); this module holds the rules, their parsing, and the
//! arithmetic that turns the counts of a window into a monitor's value.

use serde_json::{Map, Value};

use crate::histogram::{BUCKETS, p99_ms};

/// What a monitor watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metric {
    /// Key-manager calls that succeeded, in percent.
    KmsApiSuccessRate,
    /// 99th percentile of obtaining a data key from the key manager, in ms.
    DekGenerationP99,
    /// Key lookups answered by a cache (the backend's or the broker's).
    KeyCacheHitRatio,
    /// Decryptions that failed, as a fraction of decryptions.
    DecryptFailuresRate,
}

pub const MONITORS: usize = 4;

impl Metric {
    pub const ALL: [Metric; MONITORS] = [
        Metric::KmsApiSuccessRate,
        Metric::DekGenerationP99,
        Metric::KeyCacheHitRatio,
        Metric::DecryptFailuresRate,
    ];

    /// The metric's name in the guide.
    pub fn name(self) -> &'static str {
        match self {
            Metric::KmsApiSuccessRate => "kms_api_success_rate",
            Metric::DekGenerationP99 => "dek_generation_p99",
            Metric::KeyCacheHitRatio => "key_cache_hit_ratio",
            Metric::DecryptFailuresRate => "decrypt_failures_rate",
        }
    }

    /// The monitor's name in the guide.
    pub fn monitor(self) -> &'static str {
        match self {
            Metric::KmsApiSuccessRate => "KMS Connectivity",
            Metric::DekGenerationP99 => "DEK Generation Latency",
            Metric::KeyCacheHitRatio => "Key Cache Hit Rate",
            Metric::DecryptFailuresRate => "Failed Decryption Attempts",
        }
    }

    /// The unit of the value and the threshold.
    pub fn unit(self) -> &'static str {
        match self {
            Metric::KmsApiSuccessRate => "percent",
            Metric::DekGenerationP99 => "ms",
            Metric::KeyCacheHitRatio | Metric::DecryptFailuresRate => "ratio",
        }
    }

    /// Whether the monitor fires when the value falls below the threshold
    /// (a rate of success) rather than above it (a latency, a rate of failure).
    pub fn fires_below(self) -> bool {
        matches!(self, Metric::KmsApiSuccessRate | Metric::KeyCacheHitRatio)
    }

    /// The thresholds a configuration may set.
    fn threshold_range(self) -> (f64, f64) {
        match self {
            Metric::KmsApiSuccessRate => (0.0, 100.0),
            Metric::DekGenerationP99 => (0.0, 3_600_000.0),
            Metric::KeyCacheHitRatio | Metric::DecryptFailuresRate => (0.0, 1.0),
        }
    }

    /// The guide's rule.
    pub fn default_rule(self) -> Rule {
        let (threshold, window_seconds, severity) = match self {
            Metric::KmsApiSuccessRate => (99.9, 300, Severity::Critical),
            Metric::DekGenerationP99 => (1000.0, 600, Severity::Warning),
            Metric::KeyCacheHitRatio => (0.8, 3600, Severity::Info),
            Metric::DecryptFailuresRate => (0.001, 300, Severity::Critical),
        };
        Rule {
            threshold,
            window_seconds,
            severity,
            enabled: true,
        }
    }

    fn from_name(name: &str) -> Option<Metric> {
        Metric::ALL.into_iter().find(|m| m.name() == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Critical = 1,
    Warning = 2,
    Info = 3,
}

impl Severity {
    pub const ALL: [Severity; 3] = [Severity::Critical, Severity::Warning, Severity::Info];

    pub fn name(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Warning => "warning",
            Severity::Info => "info",
        }
    }

    pub fn from_code(code: u32) -> Option<Severity> {
        Severity::ALL.into_iter().find(|s| *s as u32 == code)
    }
}

/// One monitor's rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rule {
    pub threshold: f64,
    pub window_seconds: u32,
    pub severity: Severity,
    /// A disabled monitor is never evaluated (nor shown as firing).
    pub enabled: bool,
}

/// A tenant's rules, one per [`Metric`] in [`Metric::ALL`] order.
pub type Rules = [Rule; MONITORS];

/// The guide's rules.
pub fn default_rules() -> Rules {
    Metric::ALL.map(Metric::default_rule)
}

/// Shortest window a rule may have: the broker samples every
/// [`crate::counters::FINE_STEP_SECONDS`].
pub const MIN_WINDOW_SECONDS: u32 = 30;
/// Longest window a rule may have (what the broker's coarse samples cover).
pub const MAX_WINDOW_SECONDS: u32 = 3600;

/// Parses `monitoring_rules` (`{"byok_monitors": [{"metric": ..., "threshold":
/// ..., "window": "5m", "severity": "critical"}, ...]}`): each entry overrides
/// the guide's rule for its metric; what an entry leaves out stays the guide's.
pub fn parse_rules(path: &str, section: &Map<String, Value>) -> Result<Rules, (String, String)> {
    let mut rules = default_rules();
    for key in section.keys() {
        if key != "byok_monitors" {
            return Err((
                format!("{path}.{}", crate::config::printable(key)),
                "unknown field; expected one of: byok_monitors".into(),
            ));
        }
    }
    let Some(list) = section.get("byok_monitors") else {
        return Ok(rules);
    };
    let list_path = format!("{path}.byok_monitors");
    let list = list
        .as_array()
        .ok_or_else(|| (list_path.clone(), "must be a list".to_string()))?;
    let mut seen = [false; MONITORS];
    for (i, entry) in list.iter().enumerate() {
        let at = format!("{list_path}[{i}]");
        let obj = entry
            .as_object()
            .ok_or_else(|| (at.clone(), "must be an object".to_string()))?;
        const FIELDS: [&str; 6] = [
            "name",
            "metric",
            "threshold",
            "window",
            "severity",
            "enabled",
        ];
        if let Some(key) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err((
                format!("{at}.{}", crate::config::printable(key)),
                format!("unknown field; expected one of: {}", FIELDS.join(", ")),
            ));
        }
        let metric_name = obj
            .get("metric")
            .and_then(Value::as_str)
            .ok_or_else(|| (format!("{at}.metric"), "is required (a string)".to_string()))?;
        let metric = Metric::from_name(metric_name).ok_or_else(|| {
            (
                format!("{at}.metric"),
                format!(
                    "unknown metric \"{}\"; expected one of: {}",
                    crate::config::printable(metric_name),
                    Metric::ALL.map(Metric::name).join(", ")
                ),
            )
        })?;
        let index = metric as usize;
        if std::mem::replace(&mut seen[index], true) {
            return Err((
                format!("{at}.metric"),
                format!("\"{metric_name}\" is listed twice"),
            ));
        }
        if let Some(name) = obj.get("name")
            && !name.is_string()
        {
            return Err((format!("{at}.name"), "must be a string".into()));
        }
        let rule = &mut rules[index];
        if let Some(threshold) = obj.get("threshold") {
            let (low, high) = metric.threshold_range();
            rule.threshold = threshold
                .as_f64()
                .filter(|t| (low..=high).contains(t))
                .ok_or_else(|| {
                    (
                        format!("{at}.threshold"),
                        format!("must be a number from {low} to {high} ({})", metric.unit()),
                    )
                })?;
        }
        if let Some(window) = obj.get("window") {
            rule.window_seconds = window
                .as_str()
                .and_then(parse_window)
                .filter(|s| (MIN_WINDOW_SECONDS..=MAX_WINDOW_SECONDS).contains(s))
                .ok_or_else(|| {
                    (
                        format!("{at}.window"),
                        format!(
                            "must be a duration such as \"30s\", \"5m\" or \"1h\", from {MIN_WINDOW_SECONDS}s to 1h"
                        ),
                    )
                })?;
        }
        if let Some(severity) = obj.get("severity") {
            rule.severity = severity
                .as_str()
                .and_then(|s| Severity::ALL.into_iter().find(|v| v.name() == s))
                .ok_or_else(|| {
                    (
                        format!("{at}.severity"),
                        "must be one of: critical, warning, info".to_string(),
                    )
                })?;
        }
        if let Some(enabled) = obj.get("enabled") {
            rule.enabled = enabled
                .as_bool()
                .ok_or_else(|| (format!("{at}.enabled"), "must be true or false".to_string()))?;
        }
    }
    Ok(rules)
}

/// Rules in the guide's shape (what [`parse_rules`] reads back).
pub fn rules_document(rules: &Rules) -> Value {
    let monitors: Vec<Value> = Metric::ALL
        .into_iter()
        .zip(rules)
        .map(|(metric, rule)| {
            serde_json::json!({
                "name": metric.monitor(),
                "metric": metric.name(),
                "threshold": rule.threshold,
                "window": format_window(rule.window_seconds),
                "severity": rule.severity.name(),
                "enabled": rule.enabled,
            })
        })
        .collect();
    serde_json::json!({ "byok_monitors": monitors })
}

/// `"30s"`, `"5m"`, `"1h"` in seconds.
pub fn parse_window(text: &str) -> Option<u32> {
    let (number, scale) = [("s", 1), ("m", 60), ("h", 3600)]
        .into_iter()
        .find_map(|(unit, scale)| text.strip_suffix(unit).map(|n| (n, scale)))?;
    let n: u32 = number.parse().ok()?;
    n.checked_mul(scale)
}

/// A window's length in the guide's notation (`300` -> `"5m"`).
pub fn format_window(seconds: u32) -> String {
    if seconds.is_multiple_of(3600) {
        format!("{}h", seconds / 3600)
    } else if seconds.is_multiple_of(60) {
        format!("{}m", seconds / 60)
    } else {
        format!("{seconds}s")
    }
}

/// Lookups a window needs before its cache hit ratio is judged (the shipped
/// Prometheus rule asks the same).
pub const MIN_CACHE_LOOKUPS: u64 = 100;

/// The counts a window is made of (cumulative; a window is the difference
/// of two).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WindowCounts {
    pub kms_calls: u64,
    pub kms_failures: u64,
    /// Lookups answered by the backend's cache or the broker's.
    pub cache_hits: u64,
    /// Every lookup (backend hits and misses).
    pub cache_lookups: u64,
    pub decrypts: u64,
    pub decrypt_failures: u64,
    /// Latency of obtaining data keys from the key manager.
    pub dek_latency: [u64; BUCKETS],
}

impl WindowCounts {
    /// `self - older`, saturating (a counter never goes down, but a sample
    /// read while its slot was reused must not underflow).
    pub fn since(&self, older: &WindowCounts) -> WindowCounts {
        let mut dek_latency = [0; BUCKETS];
        for (i, d) in dek_latency.iter_mut().enumerate() {
            *d = self.dek_latency[i].saturating_sub(older.dek_latency[i]);
        }
        WindowCounts {
            kms_calls: self.kms_calls.saturating_sub(older.kms_calls),
            kms_failures: self.kms_failures.saturating_sub(older.kms_failures),
            cache_hits: self.cache_hits.saturating_sub(older.cache_hits),
            cache_lookups: self.cache_lookups.saturating_sub(older.cache_lookups),
            decrypts: self.decrypts.saturating_sub(older.decrypts),
            decrypt_failures: self.decrypt_failures.saturating_sub(older.decrypt_failures),
            dek_latency,
        }
    }

    pub fn add(&mut self, other: &WindowCounts) {
        self.kms_calls += other.kms_calls;
        self.kms_failures += other.kms_failures;
        self.cache_hits += other.cache_hits;
        self.cache_lookups += other.cache_lookups;
        self.decrypts += other.decrypts;
        self.decrypt_failures += other.decrypt_failures;
        for (total, n) in self.dek_latency.iter_mut().zip(&other.dek_latency) {
            *total += n;
        }
    }

    /// A metric's value over the window, in its unit; `None` when the window
    /// holds nothing to measure (no calls, no lookups, no decryptions).
    pub fn value(&self, metric: Metric) -> Option<f64> {
        let ratio = |part: u64, whole: u64| (whole > 0).then(|| part as f64 / whole as f64);
        match metric {
            Metric::KmsApiSuccessRate => ratio(
                self.kms_calls.saturating_sub(self.kms_failures),
                self.kms_calls,
            )
            .map(|r| r * 100.0),
            Metric::DekGenerationP99 => p99_ms(&self.dek_latency),
            // A handful of lookups (a new session's first misses) says nothing
            // about the caches.
            Metric::KeyCacheHitRatio if self.cache_lookups < MIN_CACHE_LOOKUPS => None,
            Metric::KeyCacheHitRatio => {
                ratio(self.cache_hits.min(self.cache_lookups), self.cache_lookups)
            }
            // A failure before a key was found is not counted as a decryption:
            // a window of failures only is a rate of 1, not a division by zero.
            Metric::DecryptFailuresRate => ratio(
                self.decrypt_failures,
                self.decrypts.max(self.decrypt_failures),
            ),
        }
    }
}

/// Whether a value breaks a rule (no value: nothing to alert on).
pub fn breaks(metric: Metric, rule: &Rule, value: Option<f64>) -> bool {
    match value {
        None => false,
        Some(v) if metric.fires_below() => v < rule.threshold,
        Some(v) => v > rule.threshold,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(doc: Value) -> Result<Rules, (String, String)> {
        parse_rules("monitoring_rules", doc.as_object().unwrap())
    }

    #[test]
    fn the_guides_rules_are_the_defaults() {
        let rules = default_rules();
        assert_eq!(rules[0].threshold, 99.9);
        assert_eq!(rules[0].window_seconds, 300);
        assert_eq!(rules[1].threshold, 1000.0);
        assert_eq!(format_window(rules[2].window_seconds), "1h");
        assert_eq!(rules[3].severity, Severity::Critical);
        // The guide's own file parses to the defaults.
        let guide = json!({"byok_monitors": [
            {"name": "KMS Connectivity", "metric": "kms_api_success_rate", "threshold": 99.9, "window": "5m", "severity": "critical"},
            {"name": "DEK Generation Latency", "metric": "dek_generation_p99", "threshold": 1000, "window": "10m", "severity": "warning"},
            {"name": "Key Cache Hit Rate", "metric": "key_cache_hit_ratio", "threshold": 0.8, "window": "1h", "severity": "info"},
            {"name": "Failed Decryption Attempts", "metric": "decrypt_failures_rate", "threshold": 0.001, "window": "5m", "severity": "critical"}
        ]});
        assert_eq!(parse(guide).unwrap(), default_rules());
    }

    #[test]
    fn overrides_and_their_errors() {
        let rules = parse(json!({"byok_monitors": [
            {"metric": "decrypt_failures_rate", "window": "30s", "threshold": 0.01},
            {"metric": "key_cache_hit_ratio", "enabled": false}
        ]}))
        .unwrap();
        assert_eq!(rules[3].window_seconds, 30);
        assert_eq!(rules[3].threshold, 0.01);
        assert_eq!(rules[3].severity, Severity::Critical);
        assert!(!rules[2].enabled);
        assert_eq!(rules[0], Metric::KmsApiSuccessRate.default_rule());
        // The stored form reads back the same.
        let stored = rules_document(&rules);
        assert_eq!(parse(stored).unwrap(), rules);
        let err = |doc| parse(doc).unwrap_err();
        assert_eq!(
            err(json!({"byok_monitors": [{"metric": "cpu"}]})).0,
            "monitoring_rules.byok_monitors[0].metric"
        );
        assert!(
            err(json!({"byok_monitors": [{"metric": "key_cache_hit_ratio", "threshold": 80}]}))
                .1
                .contains("from 0 to 1")
        );
        assert!(
            err(json!({"byok_monitors": [{"metric": "dek_generation_p99", "window": "5s"}]}))
                .1
                .contains("30s")
        );
        assert!(
            err(json!({"byok_monitors": [{"metric": "dek_generation_p99", "window": "2h"}]}))
                .1
                .contains("1h")
        );
        assert!(
            err(json!({"byok_monitors": [{"metric": "dek_generation_p99"}, {"metric": "dek_generation_p99"}]}))
                .1
                .contains("twice")
        );
        assert_eq!(
            err(json!({"byok_monitors": [{"metric": "dek_generation_p99", "treshold": 1}]})).0,
            "monitoring_rules.byok_monitors[0].treshold"
        );
        assert_eq!(err(json!({"monitors": []})).0, "monitoring_rules.monitors");
        assert!(
            err(json!({"byok_monitors": [{"metric": "dek_generation_p99", "severity": "page"}]}))
                .1
                .contains("critical")
        );
    }

    #[test]
    fn windows_and_values() {
        assert_eq!(parse_window("5m"), Some(300));
        assert_eq!(parse_window("1h"), Some(3600));
        assert_eq!(parse_window("45s"), Some(45));
        assert_eq!(parse_window("m"), None);
        assert_eq!(parse_window(""), None);
        assert_eq!(parse_window("-1m"), None);
        assert_eq!(parse_window("5é"), None);
        assert_eq!(parse_window("é"), None);
        assert_eq!(parse_window("99999999999h"), None);
        assert_eq!(format_window(90), "90s");
        let older = WindowCounts {
            kms_calls: 100,
            kms_failures: 1,
            decrypts: 1000,
            ..Default::default()
        };
        let mut newer = older;
        newer.kms_calls = 1100;
        newer.kms_failures = 3;
        newer.decrypts = 3000;
        newer.decrypt_failures = 3;
        newer.cache_lookups = 1000;
        newer.cache_hits = 900;
        let window = newer.since(&older);
        assert_eq!(window.value(Metric::KmsApiSuccessRate), Some(99.8));
        assert!(breaks(
            Metric::KmsApiSuccessRate,
            &Metric::KmsApiSuccessRate.default_rule(),
            window.value(Metric::KmsApiSuccessRate)
        ));
        assert_eq!(window.value(Metric::DecryptFailuresRate), Some(0.0015));
        assert!(breaks(
            Metric::DecryptFailuresRate,
            &Metric::DecryptFailuresRate.default_rule(),
            Some(0.0015)
        ));
        assert!(!breaks(
            Metric::DecryptFailuresRate,
            &Metric::DecryptFailuresRate.default_rule(),
            Some(0.001)
        ));
        assert_eq!(window.value(Metric::KeyCacheHitRatio), Some(0.9));
        assert_eq!(window.value(Metric::DekGenerationP99), None);
        let few = WindowCounts {
            cache_lookups: MIN_CACHE_LOOKUPS - 1,
            ..Default::default()
        };
        assert_eq!(few.value(Metric::KeyCacheHitRatio), None);
        assert!(!breaks(
            Metric::KeyCacheHitRatio,
            &Metric::KeyCacheHitRatio.default_rule(),
            None
        ));
        let failures_only = WindowCounts {
            decrypt_failures: 4,
            ..Default::default()
        };
        assert_eq!(failures_only.value(Metric::DecryptFailuresRate), Some(1.0));
        // A sample that is "newer" but smaller (a reused slot) does not underflow.
        assert_eq!(older.since(&newer).kms_calls, 0);
    }
}

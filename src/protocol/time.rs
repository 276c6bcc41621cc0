//! ISO-8601 timestamps as Celery writes them (`datetime.isoformat()`).

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};

/// Parses an ISO-8601 timestamp as Celery sends it in `eta` / `expires`.
///
/// Aware values keep their offset (converted to UTC); naive values are taken
/// as UTC, as Celery does (`maybe_make_aware(naive_as_utc=True)`).
pub fn parse_iso(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(aware) = DateTime::parse_from_rfc3339(text) {
        return Some(aware.with_timezone(&Utc));
    }
    // Python also allows a space instead of `T`.
    let normalized = text.replacen(' ', "T", 1);
    if let Ok(aware) = DateTime::parse_from_rfc3339(&normalized) {
        return Some(aware.with_timezone(&Utc));
    }
    for format in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(&normalized, format) {
            return Some(naive.and_utc());
        }
    }
    None
}

/// Formats a timestamp like Python's aware `isoformat()` in UTC:
/// `2026-11-25T16:38:05.173534+00:00`.
pub fn format_iso(when: DateTime<Utc>) -> String {
    when.to_rfc3339_opts(SecondsFormat::Micros, false)
}

/// Seconds since the Unix epoch as a float, like Python's `time.time()`.
pub fn unix_seconds(when: DateTime<Utc>) -> f64 {
    when.timestamp() as f64 + f64::from(when.timestamp_subsec_micros()) / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn parses_celery_countdown_eta() {
        let t = parse_iso("2026-11-25T16:38:05.173534+00:00").unwrap();
        assert_eq!(format_iso(t), "2026-11-25T16:38:05.173534+00:00");
    }

    #[test]
    fn keeps_foreign_offsets_and_missing_fractions() {
        let t = parse_iso("2031-01-02T05:04:05+02:00").unwrap();
        assert_eq!(t, Utc.with_ymd_and_hms(2031, 1, 2, 3, 4, 5).unwrap());
    }

    #[test]
    fn naive_values_are_utc() {
        let t = parse_iso("2031-01-02T03:04:05.5").unwrap();
        assert_eq!(
            t.timestamp(),
            Utc.with_ymd_and_hms(2031, 1, 2, 3, 4, 5)
                .unwrap()
                .timestamp()
        );
        assert_eq!(t.timestamp_subsec_millis(), 500);
    }

    #[test]
    fn garbage_is_refused() {
        assert!(parse_iso("tomorrow").is_none());
        assert!(parse_iso("").is_none());
        assert!(parse_iso("2031-13-45T99:00:00").is_none());
    }
}

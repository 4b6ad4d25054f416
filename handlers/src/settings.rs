//! Config value types shared by handler sections.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A duration written as a string with its unit: `"90s"`, `"24h"`, `"30d"`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub const fn from_secs(secs: u64) -> Self {
        HumanDuration(Duration::from_secs(secs))
    }

    pub fn get(self) -> Duration {
        self.0
    }
}

impl fmt::Debug for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl fmt::Display for HumanDuration {
    /// The way the config writes it: `24h`, `30d`, `90s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs();
        if self.0.subsec_nanos() != 0 || secs == 0 {
            write!(f, "{}", humantime::format_duration(self.0))
        } else if secs.is_multiple_of(86_400) && secs >= 7 * 86_400 {
            write!(f, "{}d", secs / 86_400)
        } else if secs.is_multiple_of(3600) {
            write!(f, "{}h", secs / 3600)
        } else if secs.is_multiple_of(60) {
            write!(f, "{}m", secs / 60)
        } else {
            write!(f, "{secs}s")
        }
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        humantime::parse_duration(raw.trim())
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {raw:?}: {e} (write it with a unit: \"90s\", \"72h\", \"30d\")"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_names_bad_values() {
        let d: HumanDuration = serde_json::from_str("\"72h\"").expect("72h");
        assert_eq!(d.get(), Duration::from_secs(72 * 3600));
        let d: HumanDuration = serde_json::from_str("\"30d\"").expect("30d");
        assert_eq!(d.get(), Duration::from_secs(30 * 86_400));
        assert_eq!(HumanDuration::from_secs(86_400).to_string(), "24h");
        assert_eq!(HumanDuration::from_secs(30 * 86_400).to_string(), "30d");
        assert_eq!(HumanDuration::from_secs(90).to_string(), "90s");
        assert_eq!(HumanDuration::from_secs(300).to_string(), "5m");
        let e = serde_json::from_str::<HumanDuration>("\"soon\"").expect_err("an error");
        assert!(e.to_string().contains("\"soon\""), "{e}");
    }
}

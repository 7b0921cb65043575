//! Sizes as recipes write them: an integer and a binary unit (`512MiB`, `2GiB`), or `auto`.
//!
//! Only binary units are accepted: `GB` is refused with a hint rather than guessed, because
//! 2 GB and 2 GiB differ by 7% and EBS volumes are sized in GiB.

use serde::{Deserialize, Serialize};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;
pub const TIB: u64 = 1024 * GIB;

const UNITS: [(&str, u64); 5] = [("B", 1), ("KiB", KIB), ("MiB", MIB), ("GiB", GIB), ("TiB", TIB)];

/// What a size string may look like, for messages.
pub const ACCEPTED: &str = "an integer and a unit (B, KiB, MiB, GiB, TiB), like \"512MiB\" or \"2GiB\"";

/// The disk size of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskSize {
    Bytes(u64),
    /// As small as the content allows, plus headroom; the disk planner decides.
    Auto,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("`{0}` is not a size")]
    Syntax(String),
    #[error("`{got}` uses the decimal unit {unit}; kiln sizes are binary: write `{number}{binary}`")]
    DecimalUnit { got: String, unit: String, number: String, binary: &'static str },
    #[error("`{0}` has no unit")]
    NoUnit(String),
    #[error("`{0}` does not fit in 64 bits of bytes")]
    Overflow(String),
}

/// Parses `"2GiB"`, `"512 MiB"`, `"4096B"`; `auto` is handled by [`parse_disk_size`].
pub fn parse_bytes(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits_end);
    let unit = unit.trim_start();
    if number.is_empty() {
        return Err(SizeError::Syntax(s.to_string()));
    }
    if unit.is_empty() {
        return Err(SizeError::NoUnit(s.to_string()));
    }
    let n: u64 = number.parse().map_err(|_| SizeError::Overflow(s.to_string()))?;
    if let Some((_, mult)) = UNITS.iter().find(|(u, _)| *u == unit) {
        return n.checked_mul(*mult).ok_or_else(|| SizeError::Overflow(s.to_string()));
    }
    let binary = match unit.to_ascii_lowercase().as_str() {
        "k" | "kb" | "kib" => "KiB",
        "m" | "mb" | "mib" => "MiB",
        "g" | "gb" | "gib" => "GiB",
        "t" | "tb" | "tib" => "TiB",
        _ => return Err(SizeError::Syntax(s.to_string())),
    };
    Err(SizeError::DecimalUnit { got: s.to_string(), unit: unit.to_string(), number: number.to_string(), binary })
}

pub fn parse_disk_size(s: &str) -> Result<DiskSize, SizeError> {
    if s.trim() == "auto" {
        return Ok(DiskSize::Auto);
    }
    parse_bytes(s).map(DiskSize::Bytes)
}

/// `2 GiB`, `512 MiB`, `1536 MiB`: the largest unit that divides the size exactly.
pub fn display_bytes(bytes: u64) -> String {
    for (unit, mult) in UNITS.iter().rev() {
        if bytes >= *mult && bytes % mult == 0 {
            return format!("{} {unit}", bytes / mult);
        }
    }
    format!("{bytes} B")
}

impl std::fmt::Display for DiskSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskSize::Bytes(b) => f.write_str(&display_bytes(*b)),
            DiskSize::Auto => f.write_str("auto"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_units() {
        assert_eq!(parse_bytes("2GiB"), Ok(2 * GIB));
        assert_eq!(parse_bytes("512MiB"), Ok(512 * MIB));
        assert_eq!(parse_bytes("512 MiB"), Ok(512 * MIB));
        assert_eq!(parse_bytes("4KiB"), Ok(4096));
        assert_eq!(parse_bytes("1TiB"), Ok(TIB));
        assert_eq!(parse_bytes("4096B"), Ok(4096));
        assert_eq!(parse_bytes(" 8GiB "), Ok(8 * GIB));
    }

    #[test]
    fn auto() {
        assert_eq!(parse_disk_size("auto"), Ok(DiskSize::Auto));
        assert_eq!(parse_disk_size("2GiB"), Ok(DiskSize::Bytes(2 * GIB)));
        assert!(parse_disk_size("Auto").is_err());
    }

    #[test]
    fn decimal_units_are_refused_with_the_binary_spelling() {
        let e = parse_bytes("2GB").unwrap_err();
        assert_eq!(
            e,
            SizeError::DecimalUnit { got: "2GB".into(), unit: "GB".into(), number: "2".into(), binary: "GiB" }
        );
        assert!(e.to_string().contains("write `2GiB`"), "{e}");
        assert!(matches!(parse_bytes("2G"), Err(SizeError::DecimalUnit { binary: "GiB", .. })));
        assert!(matches!(parse_bytes("2gib"), Err(SizeError::DecimalUnit { binary: "GiB", .. })));
        assert!(matches!(parse_bytes("100mb"), Err(SizeError::DecimalUnit { binary: "MiB", .. })));
    }

    #[test]
    fn malformed() {
        assert_eq!(parse_bytes("2048"), Err(SizeError::NoUnit("2048".into())));
        assert_eq!(parse_bytes(""), Err(SizeError::Syntax("".into())));
        assert_eq!(parse_bytes("GiB"), Err(SizeError::Syntax("GiB".into())));
        assert_eq!(parse_bytes("-1GiB"), Err(SizeError::Syntax("-1GiB".into())));
        assert_eq!(parse_bytes("1.5GiB"), Err(SizeError::Syntax("1.5GiB".into())));
        assert_eq!(parse_bytes("2 parsecs"), Err(SizeError::Syntax("2 parsecs".into())));
    }

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        assert_eq!(parse_bytes("16777216TiB"), Err(SizeError::Overflow("16777216TiB".into())));
        assert_eq!(parse_bytes("99999999999999999999B"), Err(SizeError::Overflow("99999999999999999999B".into())));
        assert_eq!(parse_bytes("16777215TiB"), Ok(16_777_215 * TIB));
    }

    proptest::proptest! {
        /// Whatever display_bytes prints (minus its space) parses back to the same bytes.
        #[test]
        fn display_round_trips(n in 1u64..=1 << 20, unit in 0usize..5) {
            let bytes = n * UNITS[unit].1;
            let shown = display_bytes(bytes).replace(' ', "");
            proptest::prop_assert_eq!(parse_bytes(&shown), Ok(bytes));
        }
    }

    #[test]
    fn display_picks_the_exact_unit() {
        assert_eq!(display_bytes(2 * GIB), "2 GiB");
        assert_eq!(display_bytes(1536 * MIB), "1536 MiB");
        assert_eq!(display_bytes(1000), "1000 B");
        assert_eq!(DiskSize::Auto.to_string(), "auto");
    }
}

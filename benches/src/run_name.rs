//! Names for a run's results: the day of the run and the commit measured
//! (`2026-12-04-f87b244`), the scheme `benches/results/README.md` describes, so a file
//! says what code it measured and when, never which sitting produced it.

use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::BenchError;

/// `<date>-<commit>` for a run starting now of the code in `source_tree`; a tree with
/// uncommitted changes is `<commit>-dirty`, and one git cannot read `unknown-commit`.
pub fn run_stem(source_tree: &Path) -> String {
    let commit = commit(source_tree).unwrap_or_else(|error| {
        eprintln!("note: results named without a commit: {error}");
        "unknown-commit".to_string()
    });
    format!("{}-{commit}", utc_date(SystemTime::now()))
}

/// The UTC day of `time`, `YYYY-MM-DD` (before 1970: 1970-01-01).
pub fn utc_date(time: SystemTime) -> String {
    let seconds = time
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let (year, month, day) = civil_from_days(seconds / 86_400);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The Gregorian (year, month, day) `days` after 1970-01-01: Howard Hinnant's
/// `civil_from_days`, for days on or after the epoch.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let shifted = days + 719_468; // days since 0000-03-01
    let era = shifted / 146_097;
    let day_of_era = shifted % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153; // 0 = March
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

/// `git rev-parse --short HEAD` of `source_tree`, with `-dirty` when tracked files
/// differ from it.
pub fn commit(source_tree: &Path) -> Result<String, BenchError> {
    let head = git(source_tree, &["rev-parse", "--short", "HEAD"])?;
    let changes = git(
        source_tree,
        &["status", "--porcelain", "--untracked-files=no"],
    )?;
    Ok(if changes.is_empty() {
        head
    } else {
        format!("{head}-dirty")
    })
}

fn git(source_tree: &Path, args: &[&str]) -> Result<String, BenchError> {
    let what = format!("git {} in {}", args.join(" "), source_tree.display());
    let output = Command::new("git")
        .arg("-C")
        .arg(source_tree)
        .args(args)
        .output()
        .map_err(|source| BenchError::Io {
            what: what.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(BenchError::Failed {
            what,
            reason: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn date(seconds: u64) -> String {
        utc_date(UNIX_EPOCH + Duration::from_secs(seconds))
    }

    #[test]
    fn dates_are_utc_days() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(86_399), "1970-01-01");
        assert_eq!(date(86_400), "1970-01-02");
        // Leap days, and the turn of a century that is not a leap year but whose
        // fourth century is.
        assert_eq!(date(951_782_400), "2000-02-29");
        assert_eq!(date(4_107_456_000), "2100-02-28");
        assert_eq!(date(4_107_542_400), "2100-03-01");
        // The day the first results here were kept, at its last second.
        assert_eq!(date(1_795_823_999), "2026-11-27");
        assert_eq!(date(1_795_824_000), "2026-11-28");
        assert_eq!(utc_date(UNIX_EPOCH - Duration::from_secs(1)), "1970-01-01");
    }

    #[test]
    fn the_commit_is_this_repository_s_head() {
        let tree = Path::new(env!("CARGO_MANIFEST_DIR"));
        let Ok(commit) = commit(tree) else {
            // Built from a source archive without git: nothing to check.
            return;
        };
        let hash = commit.trim_end_matches("-dirty");
        assert!(hash.len() >= 7, "{commit}");
        assert!(hash.chars().all(|c| c.is_ascii_hexdigit()), "{commit}");
        assert!(run_stem(tree).ends_with(&commit));
    }

    #[test]
    fn a_tree_git_cannot_read_is_an_error_naming_it() {
        let error = commit(Path::new("/nonexistent/tessera")).expect_err("no repository");
        assert!(
            error.to_string().contains("/nonexistent/tessera"),
            "{error}"
        );
    }
}

//! A named check and its verdict, shared by `preflight` and `acceptance`: the contract's
//! `{"checks": [{"name", "ok", "skipped", "message", "fix"}], "passed", "failed", "skipped"}`.
//! Every failure says what was wrong and what to do; a skipped check says why it was not run.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::handler::Outcome;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// Stable and bounded (a metric label): `proxmox.permissions`, `nodes.ready`.
    pub name: String,
    pub ok: bool,
    pub skipped: bool,
    pub message: String,
    /// What to do when it failed; empty when it passed.
    pub fix: String,
}

impl Check {
    pub fn pass(name: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok: true,
            skipped: false,
            message: message.into(),
            fix: String::new(),
        }
    }

    pub fn fail(
        name: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            ok: false,
            skipped: false,
            message: message.into(),
            fix: fix.into(),
        }
    }

    /// Not run, and why (no cluster yet, no NATS from the command line): neither passed nor
    /// failed.
    pub fn skip(name: impl Into<String>, why: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok: false,
            skipped: true,
            message: why.into(),
            fix: String::new(),
        }
    }

    pub fn failed(&self) -> bool {
        !self.ok && !self.skipped
    }

    /// One line: `PASS name: message`, `FAIL name: message (fix: ...)`, `SKIP name: why`.
    pub fn line(&self) -> String {
        match (self.ok, self.skipped) {
            (_, true) => format!("SKIP {}: {}", self.name, self.message),
            (true, false) => format!("PASS {}: {}", self.name, self.message),
            (false, false) if self.fix.is_empty() => {
                format!("FAIL {}: {}", self.name, self.message)
            }
            (false, false) => format!("FAIL {}: {} (fix: {})", self.name, self.message, self.fix),
        }
    }
}

/// The checks of one run, in the order they ran.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn push(&mut self, check: Check) {
        self.checks.push(check);
    }

    pub fn passed(&self) -> usize {
        self.checks.iter().filter(|c| c.ok && !c.skipped).count()
    }

    pub fn failed(&self) -> usize {
        self.checks.iter().filter(|c| c.failed()).count()
    }

    pub fn skipped(&self) -> usize {
        self.checks.iter().filter(|c| c.skipped).count()
    }

    /// The contract's `result`.
    pub fn result(&self) -> Value {
        json!({
            "checks": self.checks,
            "passed": self.passed(),
            "failed": self.failed(),
            "skipped": self.skipped(),
        })
    }

    /// The chat line: `acceptance: 14/15 passed; failed: certificate apps/home expires in 3
    /// days`.
    pub fn summary(&self, kind: &str) -> String {
        let run = self.passed() + self.failed();
        let mut line = format!("{kind}: {}/{run} passed", self.passed());
        if self.skipped() > 0 {
            line.push_str(&format!(", {} skipped", self.skipped()));
        }
        let failures: Vec<String> = self
            .checks
            .iter()
            .filter(|c| c.failed())
            .map(|c| c.message.clone())
            .collect();
        if !failures.is_empty() {
            line.push_str(&format!("; failed: {}", failures.join("; ")));
        }
        line
    }

    /// The job's end: failed when a check failed, with every check in the result.
    pub fn outcome(&self, kind: &str) -> Outcome {
        let message = self.summary(kind);
        let result = self.result();
        if self.failed() > 0 {
            Outcome::Failed { message, result }
        } else {
            Outcome::Succeeded { message, result }
        }
    }

    /// The checks a job's `result` lists (for the metric); none when it lists none.
    pub fn of_result(result: &Value) -> Vec<Check> {
        result
            .get("checks")
            .cloned()
            .and_then(|c| serde_json::from_value(c).ok())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_lines_and_the_chat_summary() {
        let mut report = Report::default();
        report.push(Check::pass("nodes.ready", "5/5 nodes Ready"));
        report.push(Check::fail(
            "certificates",
            "certificate apps/home expires in 3 days",
            "check cert-manager's logs and the ClusterIssuer",
        ));
        report.push(Check::skip("talos.version", "no [talos] section"));
        assert_eq!(
            (report.passed(), report.failed(), report.skipped()),
            (1, 1, 1)
        );
        assert_eq!(
            report.summary("acceptance"),
            "acceptance: 1/2 passed, 1 skipped; failed: certificate apps/home expires in 3 days"
        );
        assert!(report.checks[1].line().starts_with("FAIL certificates: "));
        assert!(report.checks[1].line().contains("(fix: check cert-manager"));
        assert_eq!(
            report.checks[2].line(),
            "SKIP talos.version: no [talos] section"
        );
        let result = report.result();
        assert_eq!(result["failed"], 1);
        assert_eq!(Report::of_result(&result), report.checks);
        assert!(matches!(
            report.outcome("acceptance"),
            Outcome::Failed { .. }
        ));
        report.checks.remove(1);
        assert!(matches!(
            report.outcome("acceptance"),
            Outcome::Succeeded { .. }
        ));
    }
}

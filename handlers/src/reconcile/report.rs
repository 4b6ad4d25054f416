//! The speculative plan as a pull request comment: summary, plan text, trace id, split at
//! GitHub's comment limit, and scrubbed of every secret the agent knows and every string shaped
//! like a credential (terraform masks values it knows to be sensitive; this catches the rest).

use crate::github::split_for_comments;
use crate::reconcile::terraform::PlanSummary;
use crate::secret::{Redactor, redact_credentials};

pub struct PlanComment<'a> {
    pub env: &'a str,
    pub commit: &'a str,
    pub job_id: &'a str,
    pub trace_id: &'a str,
    pub summary: &'a PlanSummary,
    pub plan_text: &'a str,
}

/// The marker that identifies our comment on a pull request, per environment.
pub fn marker(env: &str) -> String {
    format!("infraflux:plan:{env}")
}

impl PlanComment<'_> {
    /// The comment, in as many parts as it takes.
    pub fn render(&self, redactor: &Redactor) -> Vec<String> {
        let text = redactor.redact(&redact_credentials(self.plan_text.trim_end()));
        let headline = if self.summary.has_changes() {
            self.summary.headline()
        } else {
            "no changes".to_string()
        };
        let short = &self.commit[..self.commit.len().min(12)];
        // Room for the header, the fences and the part marker GitHub::upsert_comments adds.
        let bodies = split_for_comments(&text, 1024);
        let n = bodies.len();
        bodies
            .into_iter()
            .enumerate()
            .map(|(i, body)| {
                let part = if n > 1 {
                    format!(" (part {}/{n})", i + 1)
                } else {
                    String::new()
                };
                format!(
                    "### infraflux plan for `{env}`: {headline}{part}\n\
                     commit `{short}` · job `{job}` · trace `{trace}`\n\n\
                     This is a speculative plan; nothing is applied from a pull request.\n\n\
                     ```text\n{body}\n```\n",
                    env = self.env,
                    job = self.job_id,
                    trace = self.trace_id,
                    body = body.trim_end_matches('\n'),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::github::MAX_COMMENT_CHARS;
    use crate::secret::Secret;

    #[test]
    fn comments_hold_no_secret_and_fit_githubs_limit() {
        let redactor = Redactor::default();
        redactor.register(&Secret::new("minio-secret-key-123"));
        let mut plan = String::from(
            "  + password = \"minio-secret-key-123\"\n  + key = AKIAIOSFODNN7EXAMPLE\n",
        );
        plan.push_str(&"  + resource line that is long enough to matter\n".repeat(4000));
        let summary = PlanSummary {
            add: 1,
            ..Default::default()
        };
        let parts = PlanComment {
            env: "prod",
            commit: "0123456789abcdef0123456789abcdef01234567",
            job_id: "01jd0000000000000000000000",
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
            summary: &summary,
            plan_text: &plan,
        }
        .render(&redactor);
        assert!(parts.len() > 1);
        for p in &parts {
            assert!(p.chars().count() < MAX_COMMENT_CHARS - 100);
            assert!(!p.contains("minio-secret-key-123"));
            assert!(!p.contains("AKIAIOSFODNN7EXAMPLE"));
            assert!(p.contains("4bf92f3577b34da6a3ce929d0e0e4736"));
        }
        assert!(parts[0].contains("1 to add, 0 to change, 0 to destroy (part 1/"));
    }
}

//! How handlers see other jobs: read one, find the newest of a kind, settle an approval,
//! queue a follow-up. Records answer the reads; the ingestor queues, with the same dedup as
//! every other path, so a retried parent queues its follow-up once.

use async_trait::async_trait;
use infraflux_handlers::{FollowUp, JobBook, JobEnvelope, JobQuery, JobView};

use crate::ingest::Ingestor;
use crate::records::{JobRecord, Records};

#[derive(Clone)]
pub(crate) struct Book {
    pub records: Records,
    pub ingest: Ingestor,
}

fn view(r: JobRecord) -> JobView {
    JobView {
        job_id: r.job_id,
        kind: r.kind,
        state: r.state.as_str().to_string(),
        requested_by: r.requested_by,
        commit: r.commit,
        params: r.params,
        result: r.result,
        created_at: r.created_at,
    }
}

#[async_trait]
impl JobBook for Book {
    async fn job(&self, job_id: &str) -> Result<Option<JobView>, String> {
        let found = self.records.get(job_id).await.map_err(|e| e.to_string())?;
        Ok(found.map(|(r, _)| view(r)))
    }

    async fn settle_approval(
        &self,
        job_id: &str,
        succeeded: bool,
        message: &str,
    ) -> Result<(), String> {
        self.records
            .settle_approval(job_id, succeeded, message)
            .await
            .map_err(|e| e.to_string())
    }

    async fn newest(&self, query: &JobQuery) -> Result<Option<JobView>, String> {
        let found = self
            .records
            .newest(query)
            .await
            .map_err(|e| e.to_string())?;
        Ok(found.map(view))
    }

    async fn submit_follow_up(
        &self,
        parent: &JobEnvelope,
        follow_up: FollowUp,
    ) -> Result<String, String> {
        let envelope = JobEnvelope::follow_up_of(parent, follow_up.kind, follow_up.params);
        self.ingest
            .submit(envelope)
            .await
            .map(|submitted| submitted.job_id().to_string())
            .map_err(|e| e.to_string())
    }
}

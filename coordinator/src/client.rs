//! Talking to a running coordinator: submit, follow (progress bar with step, losses, images/s
//! and ETA), list and cancel. Replies are decoded (checked) here, as they arrive.

use std::time::Duration;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use taming_proto::coordinator::{CancelRequest, JobStatusRequest, ListJobsRequest, SubmitRequest};
use taming_proto::job::{self, Job, JobSpec, JobState, Stage};
use taming_proto::tls::Transport;

/// A connected client.
pub type Client = taming_proto::CoordinatorClient;

/// Connects to `addr` (`host:port` or a URL) over `transport`, sending `token` with every
/// call.
pub async fn connect(addr: &str, token: Option<&str>, transport: &Transport) -> Result<Client> {
    let caller = taming_proto::Caller {
        token,
        session: None,
    };
    taming_proto::connect_coordinator(addr, caller, transport)
        .await
        .with_context(|| format!("connecting to the coordinator at {addr}"))
}

/// Submits a job and returns its id.
pub async fn submit(client: &mut Client, spec: &JobSpec) -> Result<String> {
    let reply = client
        .submit(SubmitRequest {
            spec: Some(spec.to_wire()),
        })
        .await
        .context("submitting the job")?;
    Ok(reply.into_inner().job_id)
}

/// How long `follow` waits for a coordinator that does not answer (restarting) before it
/// gives up.
pub const COORDINATOR_WAIT: Duration = Duration::from_secs(120);

/// Follows a job until it ends, drawing a progress bar (when `show`) and printing why each
/// failed attempt ended (always, on stderr); returns its final state. A coordinator that does
/// not answer is waited for up to [`COORDINATOR_WAIT`].
pub async fn follow(client: &mut Client, job_id: &str, show: bool) -> Result<Job> {
    let bar = if show {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed} < {eta}] {msg}")
            .expect("template"),
    );
    let mut printed = std::collections::HashSet::new();
    let mut unanswered_since = None;
    loop {
        let request = JobStatusRequest {
            job_id: job_id.to_string(),
        };
        let reply = match client.job_status(request).await {
            Ok(r) => r.into_inner(),
            Err(e) if e.code() == tonic::Code::Unavailable => {
                // The coordinator restarts: its jobs are in its state file.
                let since = *unanswered_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > COORDINATOR_WAIT {
                    return Err(e).with_context(|| format!("status of {job_id}"));
                }
                bar.suspend(|| {
                    eprintln!(
                        "{job_id}: the coordinator does not answer ({}); waiting",
                        e.message()
                    )
                });
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("status of {job_id}")),
        };
        unanswered_since = None;
        let job = Job::decode(reply).with_context(|| format!("status of {job_id}"))?;
        bar.set_length(job.spec.steps);
        bar.set_position(job.step);
        bar.set_message(line(&job));
        // Each failure names its attempt, so the texts are distinct.
        for f in &job.failures {
            if printed.insert(f.clone()) {
                bar.suspend(|| eprintln!("{job_id}: {f}"));
            }
        }
        if job.state.is_final() {
            bar.finish();
            return Ok(job);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One line about a job: state, attempt, workers, losses, throughput (images/s for stage 1,
/// tokens/s for the transformer), message.
pub fn line(job: &Job) -> String {
    let losses: Vec<String> = job
        .losses
        .iter()
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect();
    let unit = match job.spec.stage() {
        Stage::Transformer => "tokens/s",
        Stage::Vqgan => "img/s",
    };
    format!(
        "{} attempt {} on {} worker(s) | {} | {:.1} {unit} | {}",
        job.state,
        job.attempt,
        job.workers.len(),
        losses.join(" "),
        job.images_per_s,
        job.message
    )
}

/// Every job.
pub async fn list(client: &mut Client) -> Result<Vec<Job>> {
    let jobs = client
        .list_jobs(ListJobsRequest {})
        .await
        .context("listing jobs")?
        .into_inner()
        .jobs;
    jobs.into_iter()
        .map(|j| Job::decode(j).context("listing jobs"))
        .collect()
}

/// Cancels a job; returns its state.
pub async fn cancel(client: &mut Client, job_id: &str) -> Result<JobState> {
    let reply = client
        .cancel(CancelRequest {
            job_id: job_id.to_string(),
        })
        .await
        .with_context(|| format!("cancelling {job_id}"))?;
    job::decode_cancel_reply(reply.into_inner()).with_context(|| format!("cancelling {job_id}"))
}

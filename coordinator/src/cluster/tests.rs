//! The cluster's rules: placement, restarts, hung ranks, roles, the state file.
use super::*;
use taming_proto::job::{Collective, Conditioning, StageJob, VqganJob};

fn spec(nodes: u32, min_nodes: u32) -> JobSpec {
    JobSpec {
        config_yaml: String::new(),
        data: String::new(),
        out: "runs/x".into(),
        steps: 10,
        nodes,
        min_nodes,
        dataloaders: Vec::new(),
        collective: Collective::Ring,
        eval_every: 0,
        checkpoint_every: 0,
        resume: false,
        device: Device::cpu(),
        checkpoint_url: None,
        max_restarts: None,
        placement_timeout_s: 0,
        stage_job: StageJob::Vqgan(VqganJob {}),
    }
}

/// A registration of `name` with `devices` (text) ringing at `ring_addr`.
fn worker(name: &str, devices: &[(&str, u64)], ring_addr: &str) -> Registration {
    Registration {
        name: name.into(),
        devices: devices
            .iter()
            .map(|(d, bytes)| (d.parse().unwrap(), *bytes))
            .collect(),
        ring_addr: ring_addr.into(),
    }
}

/// A report of `state` with nothing else in it.
fn rank_report(state: RankState) -> ProgressReport {
    ProgressReport {
        worker_id: String::new(),
        job_id: String::new(),
        attempt: 0,
        rank: 0,
        step: 0,
        losses: BTreeMap::new(),
        images_per_s: 0.0,
        state,
        message: String::new(),
        retryable: false,
    }
}

fn cluster_with(n: usize, now: Instant) -> (Cluster, Vec<String>) {
    let mut c = Cluster::default();
    let ids = (0..n)
        .map(|i| {
            c.register(
                worker(&format!("h{i}"), &[], &format!("127.0.0.1:{}", 7000 + i)),
                now,
            )
        })
        .collect();
    (c, ids)
}

#[test]
fn a_job_starts_only_when_all_its_ranks_are_placed() {
    let now = Instant::now();
    let (mut c, _) = cluster_with(2, now);
    let id = c.submit(spec(3, 2));
    assert!(c.schedule(now).is_empty());
    assert_eq!(c.jobs[&id].state, JobState::Pending);
    c.register(worker("h2", &[], "127.0.0.1:7002"), now);
    let a = c.schedule(now);
    assert_eq!(a.len(), 3);
    assert_eq!(a.iter().map(|(_, a)| a.rank).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(
        a.iter()
            .all(|(_, a)| a.world_size == 3 && a.peers.len() == 3 && !a.resume)
    );
    let secret = &a[0].1.ring_secret;
    assert_eq!(secret.len(), 32);
    assert!(
        a.iter().all(|(_, a)| &a.ring_secret == secret),
        "one secret per attempt"
    );
}

#[test]
fn a_gpu_job_is_placed_only_on_workers_offering_that_device_kind() {
    let now = Instant::now();
    let (mut c, _) = cluster_with(2, now);
    let id = c.submit(JobSpec {
        device: "cuda".parse().unwrap(),
        ..spec(1, 1)
    });
    assert!(c.schedule(now).is_empty());
    assert!(
        c.jobs[&id].message.contains("with a cuda device"),
        "{}",
        c.jobs[&id].message
    );
    let gpu = c.register(
        worker(
            "gpu",
            &[("cpu", 1 << 30), ("cuda:0", 1 << 37)],
            "127.0.0.1:7009",
        ),
        now,
    );
    let a = c.schedule(now);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].0, gpu);
    let cpu_job = c.submit(spec(2, 2));
    assert_eq!(c.schedule(now).len(), 2, "cpu jobs run on any worker");
    assert_eq!(c.jobs[&cpu_job].state, JobState::Running);
}

#[test]
fn a_silent_worker_fails_the_attempt_and_the_job_resumes_on_fewer_workers() {
    let now = Instant::now();
    let (mut c, ids) = cluster_with(3, now);
    let id = c.submit(spec(3, 2));
    assert_eq!(c.schedule(now).len(), 3);
    let later = now + Duration::from_secs(10);
    c.heartbeat(&ids[0], None, later).unwrap();
    c.heartbeat(&ids[1], None, later).unwrap();
    assert_eq!(
        c.expire(later, Duration::from_secs(5)),
        vec![ids[2].clone()]
    );
    assert_eq!(c.jobs[&id].state, JobState::Pending);
    let again = c.schedule(later);
    assert_eq!(again.len(), 2);
    assert!(
        again
            .iter()
            .all(|(_, a)| a.resume && a.attempt == 2 && a.world_size == 2)
    );
    // Reports of the old attempt are told to stop.
    let old = ProgressReport {
        job_id: id.clone(),
        attempt: 1,
        ..rank_report(RankState::Running)
    };
    assert!(c.progress(&old).unwrap());
}

#[test]
fn a_job_failing_past_its_restarts_fails_with_every_reason_kept() {
    let now = Instant::now();
    let (mut c, ids) = cluster_with(1, now);
    let id = c.submit(JobSpec {
        max_restarts: Some(1),
        ..spec(1, 1)
    });
    let failed = |attempt| ProgressReport {
        worker_id: ids[0].clone(),
        job_id: id.clone(),
        attempt,
        message: "panicked: boom".into(),
        retryable: true,
        ..rank_report(RankState::Failed)
    };
    assert_eq!(c.schedule(now).len(), 1);
    c.progress(&failed(1)).unwrap();
    assert_eq!(c.jobs[&id].state, JobState::Pending);
    assert!(
        c.jobs[&id]
            .message
            .starts_with("restarting (1 of 1) after: rank 0 failed: panicked")
    );
    assert_eq!(c.schedule(now + Duration::from_secs(1)).len(), 1);
    c.progress(&failed(2)).unwrap();
    let job = c.job(&id).unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(
        job.message,
        "failed after 1 restart(s): rank 0 failed: panicked: boom"
    );
    assert_eq!(job.failures.len(), 2, "{:?}", job.failures);
    assert!(job.failures[0].starts_with("attempt 1: rank 0 failed: panicked: boom"));
    assert!(c.workers[&ids[0]].job.is_none(), "the worker is free again");
}

#[test]
fn an_exited_worker_fails_its_attempt_at_once() {
    let now = Instant::now();
    let (mut c, ids) = cluster_with(1, now);
    let id = c.submit(spec(1, 1));
    assert_eq!(c.schedule(now).len(), 1);
    assert!(c.worker_exited("h0", "killed by signal 9 (SIGKILL)"));
    assert!(
        !c.workers.contains_key(&ids[0]),
        "dropped from the registry"
    );
    let job = &c.jobs[&id];
    assert_eq!(job.state, JobState::Pending);
    assert!(
        job.message.contains("killed by signal 9"),
        "{}",
        job.message
    );
    assert!(
        !c.worker_exited("h0", "again"),
        "nothing left under that name"
    );
}

#[test]
fn a_rank_that_stops_reporting_is_dropped_and_the_job_restarts_on_the_rest() {
    let now = Instant::now();
    let (mut c, ids) = cluster_with(3, now);
    c.progress_timeout = Duration::from_secs(60);
    let id = c.submit(spec(2, 1));
    let a = c.schedule(now);
    let report = |rank: usize, step| ProgressReport {
        worker_id: a[rank].0.clone(),
        job_id: id.clone(),
        attempt: 1,
        rank: rank as u32,
        step,
        ..rank_report(RankState::Running)
    };
    c.progress(&report(0, 1)).unwrap();
    c.progress(&report(1, 1)).unwrap();
    c.progress(&report(0, 2)).unwrap();
    // Rank 1 hangs at step 1, rank 0 waits for it in the all-reduce of step 3.
    let later = now + Duration::from_secs(120);
    for w in &ids {
        c.heartbeat(w, None, later).unwrap();
    }
    let dropped = c.expire(later, Duration::from_secs(10));
    assert_eq!(dropped, vec![a[1].0.clone()], "only the lagging rank");
    let job = &c.jobs[&id];
    assert_eq!(job.state, JobState::Pending);
    assert!(
        job.message.contains("rank(s) [1] showed no progress"),
        "{}",
        job.message
    );
    let again = c.schedule(later + Duration::from_secs(1));
    assert_eq!(again.len(), 2, "on the two workers left");
    assert!(again.iter().all(|(w, _)| *w != a[1].0));
}

/// A rank between steps (in a long evaluation) whose heartbeats carry a changing work counter
/// is not taken for hung; once the counter stops, it is, counted from its last change. A
/// counter heard while the worker still runs an ended attempt counts for nothing.
#[test]
fn work_between_steps_keeps_a_rank_alive_and_its_end_starts_the_clock() {
    let now = Instant::now();
    let (mut c, ids) = cluster_with(1, now);
    c.progress_timeout = Duration::from_secs(60);
    let id = c.submit(spec(1, 1));
    let a = c.schedule(now);
    let busy = || Some((id.clone(), 1));
    c.progress(&ProgressReport {
        worker_id: a[0].0.clone(),
        job_id: id.clone(),
        attempt: 1,
        step: 1,
        ..rank_report(RankState::Running)
    })
    .unwrap();
    // Evaluating for 150 s, one batch every 30 s.
    let mut t = now;
    for work in 1..=5 {
        t += Duration::from_secs(30);
        c.heartbeat(&ids[0], busy(), t).unwrap();
        c.note_work(&ids[0], work, t);
        assert!(c.expire(t, Duration::from_secs(10)).is_empty(), "at {work}");
    }
    // The counter stops at 5: 60 s later the rank is hung.
    let quiet = t + Duration::from_secs(59);
    c.heartbeat(&ids[0], busy(), quiet).unwrap();
    c.note_work(&ids[0], 5, quiet);
    assert!(c.expire(quiet, Duration::from_secs(10)).is_empty());
    let hung = t + Duration::from_secs(61);
    c.heartbeat(&ids[0], busy(), hung).unwrap();
    c.note_work(&ids[0], 5, hung);
    assert_eq!(
        c.expire(hung, Duration::from_secs(10)),
        vec![ids[0].clone()]
    );
    assert!(
        c.jobs[&id]
            .message
            .contains("no progress (no step, no work) for 61 s"),
        "{}",
        c.jobs[&id].message
    );
}

/// Work counted while the worker's heartbeat says it runs no assignment (or another one) is
/// not progress of the rank the job placed on it.
#[test]
fn work_outside_the_assignment_is_not_progress() {
    let now = Instant::now();
    let (mut c, ids) = cluster_with(1, now);
    c.progress_timeout = Duration::from_secs(60);
    let id = c.submit(spec(1, 1));
    c.schedule(now);
    let mut t = now;
    for work in 1..=10 {
        t += Duration::from_secs(20);
        let busy = (work % 2 == 0).then(|| ("job-9999".to_string(), 1));
        c.heartbeat(&ids[0], busy, t).unwrap();
        c.note_work(&ids[0], work, t);
        c.expire(t, Duration::from_secs(10));
    }
    assert_eq!(
        c.jobs[&id].state,
        JobState::Pending,
        "{}",
        c.jobs[&id].message
    );
    assert!(c.jobs[&id].failures[0].contains("no progress"));
}

#[test]
fn a_worker_acts_only_for_itself_and_only_rank_0_publishes_the_nccl_id() {
    let now = Instant::now();
    let (mut c, ids) = cluster_with(2, now);
    let own = c.workers[&ids[0]].session.clone();
    let other = c.workers[&ids[1]].session.clone();
    assert_eq!(own.len(), 64);
    assert_ne!(own, other);
    c.authorize(&ids[0], &own).unwrap();
    let e = c.authorize(&ids[0], &other).unwrap_err();
    assert!(matches!(e, ClusterError::Forbidden(_)), "{e}");
    assert!(c.authorize(&ids[0], "").is_err());
    assert_eq!(c.session_owner(&other), Some(ids[1].as_str()));
    let id = c.submit(spec(2, 2));
    let a = c.schedule(now);
    let (rank0, rank1) = (&a[0].0, &a[1].0);
    c.check_rank(rank0, &id, 1, false).unwrap();
    assert!(
        c.check_rank(rank1, &id, 1, false).is_err(),
        "rank 1 cannot publish"
    );
    c.check_rank(rank1, &id, 1, true).unwrap();
    assert!(
        c.check_rank(rank0, &id, 2, true).is_err(),
        "another attempt"
    );
}

#[test]
fn start_up_gets_longer_than_a_step_before_a_rank_is_taken_for_hung() {
    let now = Instant::now();
    let (mut c, ids) = cluster_with(1, now);
    c.progress_timeout = Duration::from_secs(60);
    let id = c.submit(spec(1, 1));
    c.schedule(now);
    let alive = |c: &mut Cluster, t| c.heartbeat(&ids[0], None, t).unwrap();
    let t = now + Duration::from_secs(120);
    alive(&mut c, t);
    assert!(
        c.expire(t, Duration::from_secs(10)).is_empty(),
        "still starting"
    );
    let t = now + Duration::from_secs(181);
    alive(&mut c, t);
    assert_eq!(c.expire(t, Duration::from_secs(10)), vec![ids[0].clone()]);
    assert!(
        c.jobs[&id].message.contains("the limit is 180 s"),
        "{}",
        c.jobs[&id].message
    );
}

#[test]
fn a_worker_still_running_an_ended_attempt_is_told_to_stop_and_not_placed() {
    let now = Instant::now();
    let (mut c, ids) = cluster_with(2, now);
    c.progress_timeout = Duration::from_secs(60);
    let id = c.submit(spec(2, 1));
    let a = c.schedule(now);
    let busy = || Some((id.clone(), 1));
    for (w, _) in &a {
        c.heartbeat(w, busy(), now).unwrap();
    }
    // Rank 0 fails; rank 1 still runs attempt 1 (stuck in a collective, or hung).
    let failed = ProgressReport {
        worker_id: a[0].0.clone(),
        job_id: id.clone(),
        attempt: 1,
        rank: 0,
        retryable: true,
        ..rank_report(RankState::Failed)
    };
    c.progress(&failed).unwrap();
    let t = now + Duration::from_secs(1);
    c.heartbeat(&a[0].0, None, t).unwrap();
    let stop = c.heartbeat(&a[1].0, busy(), t).unwrap();
    assert_eq!(stop, vec![id.clone()], "told to stop the ended attempt");
    let again = c.schedule(t);
    assert_eq!(again.len(), 1, "placed on the worker that finished only");
    assert_eq!(again[0].0, a[0].0);
    assert!(
        c.workers[&a[1].0]
            .busy
            .as_ref()
            .is_some_and(|b| b.2 == Some(t))
    );
    // Once it has finished, it is idle again.
    let later = t + Duration::from_secs(30);
    c.heartbeat(&a[1].0, None, later).unwrap();
    assert!(c.workers[&a[1].0].idle());
    assert_eq!(ids.len(), 2);
}

#[test]
fn a_report_for_another_workers_rank_is_refused() {
    let now = Instant::now();
    let (mut c, ids) = cluster_with(2, now);
    let id = c.submit(spec(2, 2));
    let a = c.schedule(now);
    let other = if a[0].0 == ids[0] { &ids[1] } else { &ids[0] };
    let forged = ProgressReport {
        worker_id: other.clone(),
        job_id: id.clone(),
        attempt: 1,
        rank: 0,
        ..rank_report(RankState::Failed)
    };
    let e = c.progress(&forged).unwrap_err().to_string();
    assert!(e.contains("progress.rank"), "{e}");
    assert_eq!(c.jobs[&id].state, JobState::Running);
}

#[test]
fn a_job_not_placed_within_its_timeout_fails_saying_so() {
    let now = Instant::now();
    let mut c = Cluster::default();
    let id = c.submit(JobSpec {
        placement_timeout_s: 5,
        ..spec(2, 2)
    });
    c.schedule(now);
    c.schedule(now + Duration::from_secs(3));
    assert_eq!(c.jobs[&id].state, JobState::Pending);
    assert!(
        c.jobs[&id]
            .message
            .starts_with("pending for 3 s: waiting for 2 idle")
    );
    c.schedule(now + Duration::from_secs(5));
    let job = &c.jobs[&id];
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(
        job.message,
        "not placed within 5 s: waiting for 2 idle worker(s) with a cpu device; 0 idle"
    );
}

#[test]
fn jobs_survive_a_restart_and_running_ones_resume() {
    let now = Instant::now();
    let (mut c, _) = cluster_with(1, now);
    let id = c.submit(spec(1, 1));
    c.schedule(now);
    let tmp = tempfile::tempdir().unwrap();
    c.save(tmp.path()).unwrap();
    let mut back = Cluster::load(tmp.path()).unwrap();
    assert_eq!(back.jobs[&id].state, JobState::Pending);
    back.register(worker("h", &[], "127.0.0.1:9"), now);
    let a = back.schedule(now);
    assert!(a[0].1.resume);
    assert_eq!(back.submit(spec(1, 1)), "job-0002");
}

#[test]
fn non_finite_losses_are_saved_and_read_back() {
    let now = Instant::now();
    let (mut c, ids) = cluster_with(1, now);
    let id = c.submit(spec(1, 1));
    c.schedule(now);
    let report = ProgressReport {
        worker_id: ids[0].clone(),
        job_id: id.clone(),
        attempt: 1,
        step: 7,
        losses: [("total".into(), f64::NAN), ("g".into(), f64::NEG_INFINITY)].into(),
        images_per_s: f64::INFINITY,
        ..rank_report(RankState::Running)
    };
    c.progress(&report).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    c.save(tmp.path()).unwrap();
    let back = Cluster::load(tmp.path()).unwrap();
    let job = &back.jobs[&id];
    assert!(job.losses["total"].is_nan() && job.history[0].losses["total"].is_nan());
    assert_eq!(job.losses["g"], f64::NEG_INFINITY);
    assert_eq!(job.images_per_s, f64::INFINITY);
    // A state file written with nulls (how serde_json writes NaN) loads too.
    let text = std::fs::read_to_string(tmp.path().join("jobs.json")).unwrap();
    std::fs::write(
        tmp.path().join("jobs.json"),
        text.replace("\"NaN\"", "null"),
    )
    .unwrap();
    assert!(Cluster::load(tmp.path()).unwrap().jobs[&id].losses["total"].is_nan());
}

#[test]
fn a_failed_save_rolls_the_jobs_back_to_what_is_on_disk() {
    let now = Instant::now();
    let (mut c, ids) = cluster_with(1, now);
    let tmp = tempfile::tempdir().unwrap();
    c.save(tmp.path()).unwrap();
    let id = c.submit(spec(1, 1));
    assert_eq!(c.schedule(now).len(), 1);
    // A directory where the temporary file goes: the write fails (even as root).
    std::fs::create_dir(tmp.path().join(".jobs.json.tmp")).unwrap();
    let e = c.save(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("jobs.json"), "{e}");
    c.rollback();
    assert!(!c.jobs.contains_key(&id), "the unsaved job is gone");
    assert!(c.workers[&ids[0]].job.is_none(), "its worker is idle again");
    assert!(Cluster::load(tmp.path()).unwrap().jobs.is_empty());
}

#[test]
fn a_finished_job_keeps_a_thinned_loss_history_with_its_last_point() {
    let point = |step| HistoryPoint {
        step,
        at: 0.0,
        losses: BTreeMap::new(),
    };
    let mut h: Vec<HistoryPoint> = (1..=2000).map(point).collect();
    thin(&mut h, FINISHED_HISTORY_POINTS);
    assert!(h.len() <= FINISHED_HISTORY_POINTS, "{}", h.len());
    assert_eq!((h[0].step, h.last().unwrap().step), (1, 2000));
    assert!(h.windows(2).all(|w| w[0].step < w[1].step));
    let mut short: Vec<HistoryPoint> = (1..=10).map(point).collect();
    thin(&mut short, FINISHED_HISTORY_POINTS);
    assert_eq!(short.len(), 10);
}

/// A job as the untyped protocol's coordinator wrote it: the stage, collective and cond as
/// text, empty for a default.
fn untyped_job(id: &str, state: &str, stage: &str, vqgan: &str, cond: &str) -> String {
    format!(
        r#"{{"id": "{id}", "spec": {{"stage": "{stage}", "config_yaml": "", "data": "",
        "out": "/runs/{id}", "steps": 5, "nodes": 1, "min_nodes": 1, "dataloaders": [],
        "collective": "", "eval_every": 100, "checkpoint_every": 200, "resume": false,
        "device": "", "vqgan": "{vqgan}", "cond": "{cond}", "codes": "", "val_codes": "",
        "cond_vqgan": "", "checkpoint_url": "", "max_restarts": null,
        "placement_timeout_s": 0}}, "state": "{state}", "attempt": 1, "workers": [],
        "done": [], "step": 0, "losses": {{}}, "images_per_s": 0.0, "message": "",
        "history": [], "failures": [], "failed_attempts": 0}}"#
    )
}

#[test]
fn a_state_file_of_the_untyped_protocol_loads_and_is_written_back_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let jobs = [
        untyped_job("job-0001", "succeeded", "vqgan", "", ""),
        untyped_job("job-0002", "pending", "transformer", "/runs/v/model", ""),
        untyped_job("job-0003", "cancelled", "transformer", "/m", "segmentation"),
    ];
    std::fs::write(
        tmp.path().join("jobs.json"),
        format!("[{}]", jobs.join(",")),
    )
    .unwrap();
    let mut c = Cluster::load(tmp.path()).unwrap();
    assert_eq!(c.jobs["job-0001"].state, JobState::Succeeded);
    assert_eq!(c.jobs["job-0001"].spec.device, Device::cpu());
    let StageJob::Transformer(t) = &c.jobs["job-0002"].spec.stage_job else {
        panic!("a transformer job");
    };
    assert_eq!(
        (t.vqgan.as_str(), t.cond),
        ("/runs/v/model", Conditioning::None)
    );
    assert_eq!(c.jobs["job-0002"].spec.collective, Collective::Ring);
    assert_eq!(c.jobs["job-0003"].state, JobState::Cancelled);
    c.jobs.get_mut("job-0001").unwrap().step = 1;
    c.save(tmp.path()).unwrap();
    let text = std::fs::read_to_string(tmp.path().join("jobs.json")).unwrap();
    for field in [
        r#""stage": "transformer""#,
        r#""cond": "segmentation""#,
        r#""collective": "ring""#,
        r#""state": "cancelled""#,
    ] {
        assert!(text.contains(field), "{field} in {text}");
    }
    let back = Cluster::load(tmp.path()).unwrap();
    assert_eq!(back.jobs["job-0003"].spec, c.jobs["job-0003"].spec);
    assert_eq!(back.next_job, 3);
}

#[test]
fn a_stored_spec_is_checked_as_a_submitted_one() {
    let tmp = tempfile::tempdir().unwrap();
    for (job, field) in [
        (
            untyped_job("job-0001", "pending", "gan", "", ""),
            "spec.stage",
        ),
        (
            untyped_job("job-0001", "pending", "transformer", "", ""),
            "spec.transformer_job.vqgan",
        ),
        (
            untyped_job("job-0001", "failed", "transformer", "/m", "depth"),
            "spec.cond",
        ),
        (untyped_job("job-0001", "bogus", "vqgan", "", ""), "bogus"),
    ] {
        std::fs::write(tmp.path().join("jobs.json"), format!("[{job}]")).unwrap();
        let e = Cluster::load(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("jobs.json") && e.contains(field), "{field}: {e}");
    }
}

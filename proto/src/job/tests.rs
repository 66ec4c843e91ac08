//! Decoding: every refusal names its field; what is encoded decodes to itself.
use super::*;
use crate::coordinator as wire;
use crate::coordinator::job_spec::StageJob as WireStageJob;

fn transformer_spec() -> JobSpec {
    JobSpec {
        config_yaml: String::new(),
        data: "/data".into(),
        out: "/runs/t".into(),
        steps: 10,
        nodes: 2,
        min_nodes: 1,
        dataloaders: vec!["dl:1".into()],
        collective: Collective::Nccl,
        eval_every: 5,
        checkpoint_every: 5,
        resume: false,
        device: "cuda:1".parse().unwrap(),
        checkpoint_url: Some("s3://b/run".into()),
        max_restarts: Some(2),
        placement_timeout_s: 0,
        stage_job: StageJob::Transformer(TransformerJob {
            vqgan: "/runs/v/model".into(),
            cond: Conditioning::Segmentation,
            codes: Some("/codes".into()),
            val_codes: None,
            cond_vqgan: Some("/runs/seg/model".into()),
        }),
    }
}

fn vqgan_wire() -> wire::JobSpec {
    JobSpec {
        collective: Collective::Ring,
        device: Device::cpu(),
        checkpoint_url: None,
        stage_job: StageJob::Vqgan(VqganJob {}),
        ..transformer_spec()
    }
    .to_wire()
}

/// The field a refused spec names.
fn refused(m: wire::JobSpec) -> String {
    JobSpec::decode(m).unwrap_err().field
}

#[test]
fn a_spec_decodes_to_what_was_encoded() {
    let spec = transformer_spec();
    assert_eq!(JobSpec::decode(spec.to_wire()).unwrap(), spec);
    assert_eq!(spec.stage(), Stage::Transformer);
    let vqgan = JobSpec::decode(vqgan_wire()).unwrap();
    assert_eq!(vqgan.stage(), Stage::Vqgan);
    assert_eq!(JobSpec::decode(vqgan.to_wire()).unwrap(), vqgan);
}

#[test]
fn unspecified_and_unknown_enum_values_are_refused_naming_the_field() {
    let e = JobSpec::decode(wire::JobSpec {
        stage: 0,
        ..vqgan_wire()
    })
    .unwrap_err();
    assert_eq!(e.field, "spec.stage");
    assert!(
        e.reason.contains("unspecified") && e.reason.contains("vqgan, transformer"),
        "{e}"
    );
    let e = JobSpec::decode(wire::JobSpec {
        stage: 7,
        ..vqgan_wire()
    })
    .unwrap_err();
    assert_eq!(
        (e.field.as_str(), e.reason.contains("unknown stage 7")),
        ("spec.stage", true),
        "{e}"
    );
    assert_eq!(
        refused(wire::JobSpec {
            collective: 0,
            ..vqgan_wire()
        }),
        "spec.collective"
    );
    assert_eq!(
        refused(wire::JobSpec {
            collective: 3,
            ..vqgan_wire()
        }),
        "spec.collective"
    );
    let mut m = transformer_spec().to_wire();
    if let Some(WireStageJob::TransformerJob(t)) = &mut m.stage_job {
        t.cond = 9;
    }
    assert_eq!(refused(m), "spec.transformer_job.cond");
}

#[test]
fn the_stage_job_must_be_present_and_match_the_stage() {
    let e = JobSpec::decode(wire::JobSpec {
        stage_job: None,
        ..vqgan_wire()
    })
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "spec.stage_job: missing (vqgan_job or transformer_job)"
    );
    let e = JobSpec::decode(wire::JobSpec {
        stage: Stage::Transformer.to_wire(),
        ..vqgan_wire()
    })
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "spec.stage_job: a vqgan_job for stage transformer"
    );
    let e = JobSpec::decode(wire::JobSpec {
        stage: Stage::Vqgan.to_wire(),
        ..transformer_spec().to_wire()
    })
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "spec.stage_job: a transformer_job for stage vqgan"
    );
    let mut m = transformer_spec().to_wire();
    if let Some(WireStageJob::TransformerJob(t)) = &mut m.stage_job {
        t.vqgan.clear();
    }
    assert_eq!(refused(m), "spec.transformer_job.vqgan");
}

#[test]
fn devices_are_a_kind_with_an_optional_ordinal() {
    for ok in ["cpu", "cuda", "cuda:0", "cuda:12", "vulkan", "vulkan:1"] {
        let d: Device = ok.parse().unwrap();
        assert_eq!(d.as_str(), ok);
    }
    assert_eq!("cuda:3".parse::<Device>().unwrap().kind(), "cuda");
    for bad in [
        "", "gpu", "cpu:0", "cuda:", "cuda:x", "cuda:-1", "cuda:+1", "cuda:1:2",
    ] {
        assert!(bad.parse::<Device>().is_err(), "{bad}");
    }
    let empty = JobSpec::decode(wire::JobSpec {
        device: String::new(),
        ..vqgan_wire()
    })
    .unwrap();
    assert_eq!(empty.device, Device::cpu(), "empty reads as cpu");
    let e = JobSpec::decode(wire::JobSpec {
        device: "gpu".into(),
        ..vqgan_wire()
    })
    .unwrap_err();
    assert!(
        e.field == "spec.device" && e.reason.contains("`gpu`"),
        "{e}"
    );
}

#[test]
fn impossible_counts_and_sizes_name_the_field() {
    let with = |f: fn(&mut wire::JobSpec)| {
        let mut m = vqgan_wire();
        f(&mut m);
        refused(m)
    };
    assert_eq!(with(|m| m.nodes = 0), "spec.nodes");
    assert_eq!(with(|m| m.nodes = MAX_NODES + 1), "spec.nodes");
    assert_eq!(with(|m| m.min_nodes = 3), "spec.min_nodes");
    assert_eq!(with(|m| m.steps = 0), "spec.steps");
    assert_eq!(with(|m| m.out.clear()), "spec.out");
    assert_eq!(
        with(|m| m.config_yaml = "x".repeat(MAX_CONFIG_BYTES + 1)),
        "spec.config_yaml"
    );
    assert_eq!(
        with(|m| m.dataloaders = vec![String::new(); MAX_DATALOADERS + 1]),
        "spec.dataloaders"
    );
    let min0 = JobSpec::decode(wire::JobSpec {
        min_nodes: 0,
        ..vqgan_wire()
    })
    .unwrap();
    assert_eq!(min0.min_nodes, 1);
    assert_eq!(
        decode_submit(wire::SubmitRequest { spec: None })
            .unwrap_err()
            .field,
        "spec"
    );
}

#[test]
fn reports_jobs_and_cancel_replies_refuse_states_they_do_not_know() {
    let report = wire::ProgressReport {
        state: RankState::Failed.to_wire(),
        losses: [("total".to_string(), 1.5)].into(),
        ..Default::default()
    };
    let decoded = ProgressReport::decode(report.clone()).unwrap();
    assert_eq!(decoded.state, RankState::Failed);
    assert_eq!(decoded.to_wire(), report);
    for state in [0, 4, -1] {
        let e = ProgressReport::decode(wire::ProgressReport {
            state,
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.field, "state", "{state}");
    }
    let e = ProgressReport::decode(wire::ProgressReport {
        state: 1,
        message: "x".repeat(MAX_REPORT_MESSAGE + 1),
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!(e.field, "message");
    let job = Job {
        job_id: "job-0001".into(),
        state: JobState::Cancelled,
        spec: transformer_spec(),
        attempt: 1,
        workers: vec!["w1".into()],
        step: 3,
        losses: [("loss".to_string(), 0.5)].into(),
        images_per_s: 2.0,
        message: "cancelled".into(),
        failures: vec![],
    };
    assert_eq!(Job::decode(job.to_wire()).unwrap(), job);
    let e = Job::decode(wire::Job {
        state: 6,
        ..job.to_wire()
    })
    .unwrap_err();
    assert_eq!(e.field, "state");
    assert_eq!(
        decode_cancel_reply(wire::CancelReply { state: 5 }).unwrap(),
        JobState::Cancelled
    );
    assert!(decode_cancel_reply(wire::CancelReply { state: 0 }).is_err());
}

#[test]
fn assignments_and_registrations_are_checked_whole() {
    let a = Assignment {
        job_id: "job-0001".into(),
        attempt: 2,
        rank: 1,
        world_size: 2,
        peers: vec!["h:1".into(), "h:2".into()],
        spec: transformer_spec(),
        resume: true,
        ring_secret: [7; 32],
    };
    assert_eq!(Assignment::decode(a.to_wire()).unwrap(), a);
    let field = |m: wire::Assignment| Assignment::decode(m).unwrap_err().field;
    assert_eq!(
        field(wire::Assignment {
            rank: 2,
            ..a.to_wire()
        }),
        "rank"
    );
    assert_eq!(
        field(wire::Assignment {
            peers: vec![],
            ..a.to_wire()
        }),
        "peers"
    );
    assert_eq!(
        field(wire::Assignment {
            ring_secret: vec![1; 31],
            ..a.to_wire()
        }),
        "ring_secret"
    );
    assert_eq!(
        field(wire::Assignment {
            spec: None,
            ..a.to_wire()
        }),
        "spec"
    );
    let register = |ring: &str, devices: &[&str]| wire::RegisterRequest {
        name: "w".into(),
        devices: devices
            .iter()
            .map(|d| wire::Device {
                spec: d.to_string(),
                memory_bytes: 1,
            })
            .collect(),
        ring_addr: ring.into(),
    };
    let r = Registration::decode(register("h:7000", &["cpu", "cuda:0"])).unwrap();
    assert_eq!(r.devices[1].0.as_str(), "cuda:0");
    let field = |m| Registration::decode(m).unwrap_err().field;
    assert_eq!(field(register("not an address", &[])), "ring_addr");
    assert_eq!(
        field(register("h:7000", &["cpu", "tpu:0"])),
        "devices[1].spec"
    );
}

#[test]
fn enum_texts_are_the_command_lines_spellings() {
    use clap::ValueEnum;
    for stage in Stage::ALL {
        let name = stage.to_possible_value().unwrap();
        assert_eq!(name.get_name(), stage.as_str());
        assert_eq!(stage.as_str().parse::<Stage>().unwrap(), *stage);
    }
    assert_eq!(Stage::Transformer.to_string(), "transformer");
    for cond in Conditioning::ALL {
        assert_eq!(cond.to_possible_value().unwrap().get_name(), cond.as_str());
    }
    let states: Vec<String> = JobState::ALL.iter().map(ToString::to_string).collect();
    assert_eq!(
        states,
        ["pending", "running", "succeeded", "failed", "cancelled"]
    );
    assert!(JobState::Failed.is_final() && !JobState::Running.is_final());
    let e = "gan".parse::<Stage>().unwrap_err();
    assert!(
        e.contains("`gan`") && e.contains("vqgan, transformer"),
        "{e}"
    );
}

#[test]
fn a_refusal_is_an_invalid_argument_naming_the_field() {
    let status = tonic::Status::from(DecodeError::new("spec.stage", "stage unspecified"));
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), "spec.stage: stage unspecified");
}

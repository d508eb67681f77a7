//! Bad input from a site is refused with a precise gRPC status, and the round
//! goes on with the others. Three real participants run; the test itself
//! plays the fourth hospital (`va`) over a real gRPC connection and sends the
//! coordinator every kind of bad update before behaving.

use std::time::Duration;

use tessera_models::data::read_csv;
use tessera_models::schema::Schema;
use tessera_protocol::ledger::payload::DeclaredCounts;
use tessera_protocol::ledger::sign_decision;
use tessera_protocol::model::encode_params;
use tessera_protocol::pb::federation_client::FederationClient;
use tessera_protocol::pb::{self, task, update_chunk};
use tessera_protocol::stats::FeatureStats;
use tessera_tests::{Federation, SITES, plaintext_job, repo};
use tonic::Code;
use tonic::transport::Channel;

const ME: &str = "va";

type Client = FederationClient<Channel>;

async fn poll(client: &mut Client) -> task::Kind {
    // Bounded: the job moves on within a few long polls or the test fails.
    for _ in 0..60 {
        let reply = client
            .poll_task(pb::PollTaskRequest {
                site_id: ME.into(),
                ..Default::default()
            })
            .await
            .expect("poll")
            .into_inner();
        match reply.kind {
            Some(task::Kind::Idle(_)) | None => tokio::time::sleep(Duration::from_millis(50)).await,
            Some(kind) => return kind,
        }
    }
    panic!("no task for {ME}");
}

async fn poll_round(client: &mut Client, round: u32) -> pb::RoundAnnouncement {
    for _ in 0..60 {
        if let task::Kind::Round(a) = poll(client).await
            && a.round == round
        {
            return a;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("round {round} never announced");
}

#[derive(Clone)]
struct Update {
    site: String,
    job_id: u64,
    round: u32,
    base: String,
    declared_len: u64,
    values: Vec<f32>,
}

async fn send(client: &mut Client, u: &Update) -> Result<(), tonic::Status> {
    let mut messages = vec![pb::UpdateChunk {
        kind: Some(update_chunk::Kind::Header(pb::UpdateHeader {
            site_id: u.site.clone(),
            job_id: u.job_id,
            round: u.round,
            n_samples: 85,
            n_params: u.declared_len,
            base_model_hash: u.base.clone(),
            train_loss: 0.5,
            masked: false,
            wait_for_task: false,
        })),
    }];
    messages.push(pb::UpdateChunk {
        kind: Some(update_chunk::Kind::Data(encode_params(&u.values))),
    });
    client.submit_update(tokio_stream::iter(messages)).await.map(|_| ())
}

fn check(result: Result<(), tonic::Status>, code: Code, message_part: &str) {
    let status = result.expect_err("bad update accepted");
    assert_eq!(status.code(), code, "{}", status.message());
    assert!(
        status.message().contains(message_part),
        "`{}` lacks `{message_part}`",
        status.message()
    );
}

fn hex_bytes(hex: &str) -> [u8; 32] {
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect();
    bytes.try_into().expect("32 bytes")
}

/// Reports this site's metrics, after a report whose clinical metrics are
/// out of range has been refused with the field named (nothing stored: the
/// good report that follows is the one the job shows).
async fn report_metrics(client: &mut Client, a: &pb::RoundAnnouncement) {
    let report = pb::MetricsReport {
        site_id: ME.into(),
        job_id: a.job_id,
        round: a.round,
        model_hash: a.model_hash.clone(),
        n_test: 45,
        loss: 0.6,
        accuracy: 0.5,
        auc: f64::NAN,
        withheld: false,
        binary: Some(pb::BinaryMetrics {
            brier: Some(0.25),
            threshold: 0.5,
            ..Default::default()
        }),
    };
    let mut bad = report.clone();
    bad.binary.as_mut().unwrap().ppv = Some(f64::NAN);
    check(
        client.report_metrics(bad).await.map(|_| ()),
        Code::InvalidArgument,
        "binary.ppv",
    );
    client.report_metrics(report).await.expect("metrics");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_updates_are_refused_precisely_and_the_round_goes_on() {
    let mut federation = Federation::start(&SITES);
    // Plaintext updates are what the coordinator validates value by value, so
    // this test runs a plaintext job (which the sites must explicitly allow).
    for site in &SITES[..3] {
        federation.add_site_with(site, &["--allow-insecure-plaintext"]);
    }
    // This test is site `va`: it connects with va's kit.
    let tls = tessera_protocol::keyfile::client_tls(&federation.state_dir(ME)).unwrap();
    let channel = tonic::transport::Channel::from_shared(federation.addr.clone())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = FederationClient::new(channel);
    let job_text = plaintext_job(&[("rounds", "2")]);
    let job = federation.write_job("job.toml", &job_text);
    let job_id = federation.submit(&job);

    // Preprocessing: honest statistics of the real VA data.
    let task::Kind::ComputeStats(stats_task) = poll(&mut client).await else {
        panic!("expected stats task")
    };
    let schema =
        Schema::from_toml(&std::fs::read_to_string(repo().join("examples/heart-disease/schema.toml")).unwrap())
            .unwrap();
    let data_path = repo().join("../shared/data/heart-disease/processed.va.data");
    let (data, _) = read_csv(&data_path, &schema).unwrap();
    let (train, test) = data.split(&schema.split);
    let mut stats = FeatureStats::of_rows(train.n_features, train.rows());
    stats.add_labels(&train.labels);
    let report = pb::StatsReport {
        site_id: ME.into(),
        job_id: stats_task.job_id,
        count: stats.count,
        sum: stats.sum,
        sum_sq: stats.sum_sq,
        missing: stats.missing,
        features_hash: schema.features_hash(),
        n_features: 0,
        positives: stats.positives,
    };
    // A site that has not accepted the job on the ledger takes no part in
    // it, not even with its statistics.
    check(
        client.submit_stats(report.clone()).await.map(|_| ()),
        Code::FailedPrecondition,
        "has not accepted job",
    );
    // va's signed acceptance, as its daemon would send it.
    let key = tessera_protocol::keyfile::load_or_create(&federation.state_dir(ME).join("site.key")).unwrap();
    let job_sha256: [u8; 32] = hex_bytes(&stats_task.job_hash);
    let counts = DeclaredCounts {
        n_train: train.len() as u64,
        n_test: test.len() as u64,
    };
    let decision = pb::JobDecision {
        site_id: ME.into(),
        job_id: stats_task.job_id,
        job_hash: stats_task.job_hash.clone(),
        accepted: true,
        reason: "test site".into(),
        signature: sign_decision(&key, stats_task.job_id, &job_sha256, true, Some(&counts)),
        counts: Some(pb::DeclaredCounts {
            n_train: counts.n_train,
            n_test: counts.n_test,
        }),
        proposal: None,
    };
    // A category proposal that is not va's own signature for this job (a
    // key va does not hold; va's key for another job) is refused with the
    // acceptance it came with, and nothing is recorded.
    let job = tessera_protocol::discovery::JobRef {
        job_id: stats_task.job_id,
        job_sha256: &job_sha256,
    };
    let other_job = tessera_protocol::discovery::JobRef {
        job_id: stats_task.job_id + 1,
        job_sha256: &job_sha256,
    };
    let stranger = tessera_protocol::secagg::crypto::SigningKey::from_pkcs8(
        &tessera_protocol::secagg::crypto::SigningKey::generate_pkcs8(),
    )
    .unwrap();
    let me = tessera_protocol::ids::SiteId::new(ME).unwrap();
    let values = tessera_protocol::discovery::Proposal {
        columns: [("cp".to_owned(), ["9".to_owned()].into())].into(),
    };
    for forged in [
        tessera_protocol::discovery::sign(&stranger, job, &me, values.clone()),
        tessera_protocol::discovery::sign(&key, other_job, &me, values.clone()),
    ] {
        let refused = client
            .decide_job(pb::JobDecision {
                proposal: Some(tessera_protocol::wire::proposal_to_pb(&forged)),
                ..decision.clone()
            })
            .await
            .expect_err("a forged proposal is refused");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains("category proposal"), "{refused:?}");
    }
    client.decide_job(decision).await.expect("decision");
    // A features hash is a SHA-256 in hex; anything else (here with a
    // multi-byte character where the coordinator cuts its display prefix)
    // is refused, and the job goes on.
    for bad in ["a".repeat(15) + "é" + &"0".repeat(47), "00".into()] {
        let mut bad_report = report.clone();
        bad_report.features_hash = bad;
        check(
            client.submit_stats(bad_report).await.map(|_| ()),
            Code::InvalidArgument,
            "features_hash must be 64 hex digits",
        );
    }
    client.submit_stats(report).await.unwrap();

    // Round 1: every kind of bad update, then a good one.
    let a = poll_round(&mut client, 1).await;
    let n = a.n_params as usize;
    let good = Update {
        site: ME.into(),
        job_id,
        round: 1,
        base: a.model_hash.clone(),
        declared_len: n as u64,
        values: vec![0.0; n],
    };
    let mut nan = good.clone();
    nan.values[3] = f32::NAN;
    let mut inf = good.clone();
    inf.values[0] = f32::INFINITY;
    check(
        send(
            &mut client,
            &Update {
                site: "mallory".into(),
                ..good.clone()
            },
        )
        .await,
        Code::PermissionDenied,
        // va's certificate cannot speak for another site.
        "cannot act as site `mallory`",
    );
    check(
        send(
            &mut client,
            &Update {
                site: "Not A Site".into(),
                ..good.clone()
            },
        )
        .await,
        Code::InvalidArgument,
        "may only contain",
    );
    check(
        send(
            &mut client,
            &Update {
                declared_len: n as u64 - 1,
                values: vec![0.0; n - 1],
                ..good.clone()
            },
        )
        .await,
        Code::InvalidArgument,
        &format!("expected {n}"),
    );
    check(
        send(
            &mut client,
            &Update {
                values: vec![0.0; n - 1],
                ..good.clone()
            },
        )
        .await,
        Code::InvalidArgument,
        &format!("expected {n}"),
    );
    check(
        send(
            &mut client,
            &Update {
                values: vec![0.0; n + 1],
                ..good.clone()
            },
        )
        .await,
        Code::InvalidArgument,
        "longer than",
    );
    check(
        send(&mut client, &nan).await,
        Code::InvalidArgument,
        "parameter 3 is not finite",
    );
    check(
        send(&mut client, &inf).await,
        Code::InvalidArgument,
        "parameter 0 is not finite",
    );
    check(
        send(
            &mut client,
            &Update {
                round: 2,
                ..good.clone()
            },
        )
        .await,
        Code::FailedPrecondition,
        "open round is 1",
    );
    check(
        send(
            &mut client,
            &Update {
                job_id: 999,
                ..good.clone()
            },
        )
        .await,
        Code::FailedPrecondition,
        "job 999 is not running",
    );
    check(
        send(
            &mut client,
            &Update {
                base: "0".repeat(64),
                ..good.clone()
            },
        )
        .await,
        Code::FailedPrecondition,
        "relative to model",
    );
    // Metrics last: the round stays open until this site has reported them.
    send(&mut client, &good).await.expect("good update refused");
    check(send(&mut client, &good).await, Code::AlreadyExists, "already submitted");
    report_metrics(&mut client, &a).await;

    // Round 2: an update for the finished round 1 is stale.
    let a2 = poll_round(&mut client, 2).await;
    check(
        send(&mut client, &good).await,
        Code::FailedPrecondition,
        "open round is 2",
    );
    report_metrics(&mut client, &a2).await;
    send(
        &mut client,
        &Update {
            round: 2,
            base: a2.model_hash.clone(),
            ..good.clone()
        },
    )
    .await
    .expect("round 2 update");

    // Final evaluation: no round accepts updates any more.
    let a3 = poll_round(&mut client, 3).await;
    assert!(!a3.train);
    check(
        send(
            &mut client,
            &Update {
                round: 3,
                base: a3.model_hash.clone(),
                ..good.clone()
            },
        )
        .await,
        Code::FailedPrecondition,
        "no updates accepted",
    );
    report_metrics(&mut client, &a3).await;

    let status = tokio::task::spawn_blocking(move || {
        let status = federation.wait_for(job_id, &["finished", "failed", "cancelled"]);
        (status, federation.log("coordinator"))
    })
    .await
    .unwrap();
    let (status, log) = status;
    assert_eq!(status["job"]["status"], "finished", "{status:#}");
    for round in status["rounds"].as_array().unwrap() {
        assert_eq!(round["sites"].as_array().unwrap().len(), 4, "{round}");
    }
    if std::env::var_os("TESSERA_TEST_LOG").is_some() {
        eprintln!("{log}");
    }
    // Refusals are logged with the site and the reason.
    assert!(log.contains("update refused"), "{log}");
    assert!(log.contains("parameter 3 is not finite"), "{log}");
    assert!(log.contains("site impersonation refused"), "{log}");
}

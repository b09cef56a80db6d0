//! The real binary: the demo, and `baygrid up` driven through the CLI.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

#[test]
fn the_demo_runs_every_job_as_expected_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_arg = data.to_str().unwrap();
    let output = baygrid(&["demo", "--output", "json", "--data-dir", data_arg], &[]);
    assert!(
        output.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        stdout(&output),
        stderr(&output)
    );
    let rows: Vec<Value> = serde_json::from_str(&stdout(&output)).unwrap();
    assert!(rows.len() >= 18, "{rows:?}");
    assert!(rows.iter().all(|r| r["as_expected"] == true), "{rows:#?}");
    let states = |s: &str| rows.iter().filter(|r| r["state"] == s).count();
    assert_eq!(states("rejected"), 1);
    assert_eq!(states("cancelled"), 1);
    assert_eq!(states("failed"), 1);
    assert!(states("succeeded") >= 15);
    let sites: std::collections::BTreeSet<&str> =
        rows.iter().filter_map(|r| r["site"].as_str()).collect();
    assert_eq!(sites.len(), 6, "every sample site ran something: {sites:?}");
    let gang = rows
        .iter()
        .find(|r| r["job"] == "llm-pretrain-gang")
        .unwrap();
    assert_eq!(gang["state"], "succeeded");
    let rejected = rows.iter().find(|r| r["state"] == "rejected").unwrap();
    assert!(rejected["why"]
        .as_str()
        .unwrap()
        .contains("resources.accelerators"));

    // the stopped exchange's log, exported from its data directory, verifies offline
    let export = dir.path().join("export");
    let export_arg = export.to_str().unwrap();
    let out = baygrid(
        &[
            "--data-dir",
            data_arg,
            "audit",
            "export",
            export_arg,
            "--offline",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = baygrid(&["audit", "verify", export_arg], &[]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("root matches"), "{}", stdout(&out));

    // reconcile the log's ledger with its jobs: each job's post equals the price × the
    // accelerator-seconds between its last start and its end, and equals its metered cost
    let entries: Vec<Value> = std::fs::read_to_string(export.join("entries.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut started = std::collections::HashMap::new();
    let mut ended = std::collections::HashMap::new();
    let mut placed = std::collections::HashMap::new();
    let mut metered = std::collections::HashMap::new();
    let mut posted = std::collections::HashMap::new();
    for e in &entries {
        let p = &e["payload"];
        match e["kind"].as_str().unwrap() {
            "job.transition" if p["to"] == "running" => {
                started.insert(
                    p["job"].as_str().unwrap().to_string(),
                    e["at"].as_i64().unwrap(),
                );
            }
            "job.transition"
                if ["succeeded", "failed", "cancelled"].contains(&p["to"].as_str().unwrap()) =>
            {
                ended.insert(
                    p["job"].as_str().unwrap().to_string(),
                    e["at"].as_i64().unwrap(),
                );
            }
            "job.placement" => {
                placed.insert(
                    p["job"].as_str().unwrap().to_string(),
                    p["allocation"].clone(),
                );
            }
            "job.metered" => {
                metered.insert(
                    p["job"].as_str().unwrap().to_string(),
                    p["cost_cny_minor"].as_i64().unwrap(),
                );
            }
            "ledger.transfers" => {
                for t in p["transfers"].as_array().unwrap() {
                    if t["kind"] == "post" {
                        let job = t["id"].as_str().unwrap().strip_prefix("post:").unwrap();
                        posted.insert(job.to_string(), t["amount"].as_i64().unwrap());
                    }
                }
            }
            _ => {}
        }
    }
    let charged: Vec<&String> = metered
        .iter()
        .filter(|(_, c)| **c > 0)
        .map(|(j, _)| j)
        .collect();
    // Demo jobs run for about a second, so most round to 0.00 CNY; which of
    // the cheap ones reach a fen depends on the machine's speed. The
    // many-accelerator gang and thesis-train always do; each job's exact
    // figure is checked against its own run time below.
    assert!(charged.len() >= 2, "{metered:?}");
    for (job, cost) in &metered {
        assert_eq!(posted.get(job).copied().unwrap_or(0), *cost, "job {job}");
        let allocation = &placed[job];
        let price = allocation["price_per_accelerator_hour"].as_str().unwrap();
        if let Some(cny) = price.strip_suffix(" CNY") {
            let fen: i64 = cny.replace('.', "").parse().unwrap();
            let accelerators = allocation["accelerators_per_node"].as_i64().unwrap()
                * allocation["nodes"].as_array().unwrap().len() as i64;
            let ms = ended[job] - started.get(job).copied().unwrap_or(ended[job]);
            let expected = (2 * fen * accelerators * ms + 3_600_000) / 7_200_000;
            assert_eq!(
                *cost, expected,
                "job {job}: {fen} fen × {accelerators} × {ms} ms"
            );
        }
    }
    let row_costs: i64 = rows
        .iter()
        .filter_map(|r| r["cost"].as_str())
        .map(|c| {
            c.trim_end_matches(" CNY")
                .replace('.', "")
                .parse::<i64>()
                .unwrap()
        })
        .sum();
    assert_eq!(row_costs, posted.values().sum::<i64>());
}

#[test]
fn up_serves_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_arg = data.to_str().unwrap();
    let (mut up, server) = spawn_up(data_arg, &dir.path().join("up.log"));
    wait_healthy(&server, Duration::from_secs(30));
    let operator_env = [
        ("BAYGRID_SERVER", server.as_str()),
        ("BAYGRID_DATA_DIR", data_arg),
    ];

    // agents register
    let mut online = 0;
    for _ in 0..100 {
        let out = baygrid(&["cluster", "ls", "--output", "json"], &operator_env);
        assert!(out.status.success(), "{}", stderr(&out));
        let clusters: Vec<Value> = serde_json::from_str(&stdout(&out)).unwrap();
        online = clusters.iter().filter(|c| c["online"] == true).count();
        if online == 6 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(online, 6);
    // `up` says where the console and the API's docs are, once it has started everything
    let console = format!("console: {server}/console");
    let mut log = String::new();
    for _ in 0..300 {
        log = std::fs::read_to_string(dir.path().join("up.log")).unwrap();
        if log.contains(&console) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(log.contains(&console), "{log}");
    assert!(log.contains(&format!("{server}/api/v1/docs/")), "{log}");
    let out = baygrid(&["site", "ls"], &operator_env);
    assert!(stdout(&out).contains("hk-cyberport"), "{}", stdout(&out));
    let out = baygrid(&["offer", "ls"], &operator_env);
    assert!(stdout(&out).contains("30.00 HKD"));
    let out = baygrid(&["tenant", "ls"], &operator_env);
    assert!(stdout(&out).contains("gz-ai-lab"));
    let out = baygrid(
        &[
            "party",
            "add",
            "sz-robotics",
            "--jurisdiction",
            "CN",
            "--city",
            "shenzhen",
        ],
        &operator_env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = baygrid(
        &["party", "add", "bad", "--jurisdiction", "XX", "--city", "x"],
        &operator_env,
    );
    assert!(!out.status.success());
    let out = baygrid(
        &[
            "tenant",
            "add",
            "sz-robotics",
            "--party",
            "sz-robotics",
            "--budget",
            "500.00 CNY",
        ],
        &operator_env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = baygrid(
        &[
            "tenant",
            "add",
            "ghost",
            "--party",
            "nobody",
            "--budget",
            "500.00 CNY",
        ],
        &operator_env,
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("party"), "{}", stderr(&out));
    let out = baygrid(
        &[
            "token",
            "issue",
            "--role",
            "tenant",
            "--subject",
            "sz-robotics",
            "--expires-in",
            "90days",
            "--output",
            "json",
        ],
        &operator_env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let issued: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let tenant_token = issued["token"].as_str().unwrap().to_string();
    let expires_at = issued["expires_at"].as_str().unwrap().to_string();
    let out = baygrid(&["token", "ls"], &operator_env);
    assert!(stdout(&out).contains(&expires_at), "{}", stdout(&out));
    let out = baygrid(
        &[
            "token",
            "issue",
            "--role",
            "regulator",
            "--expires-in",
            "soon",
        ],
        &operator_env,
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("expires_in: `soon` is not a duration"),
        "{}",
        stderr(&out)
    );

    // a tenant submits, waits, reads logs and history
    let tenant_env = [
        ("BAYGRID_SERVER", server.as_str()),
        ("BAYGRID_TOKEN", tenant_token.as_str()),
    ];
    let spec = dir.path().join("job.yaml");
    std::fs::write(&spec, "name: hello\nresources:\n  accelerators: [{H800: 1}, {A800: 1}]\ncommand: echo hello from $BAYGRID_RANK\nestimated_duration: 1m\nlatency_sensitive: true\n").unwrap();
    let spec_arg = spec.to_str().unwrap();
    let out = baygrid(&["job", "quote", spec_arg], &tenant_env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("qianhai-h800") && stdout(&out).contains("chosen"),
        "{}",
        stdout(&out)
    );
    // the minute is for an A800; Shenzhen's H800s do it in 19 s, cheaper in total than
    // Guangzhou's A800s at a lower hourly price
    assert!(
        stdout(&out).contains("would run on qianhai-h800"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("nansha-a800"), "{}", stdout(&out));
    for column in [
        "COMPUTE",
        "TRANSFER",
        "GREEN",
        "TOTAL",
        "WAIT",
        "START (UTC)",
    ] {
        assert!(stdout(&out).contains(column), "{}", stdout(&out));
    }
    let out = baygrid(
        &["job", "submit", spec_arg, "--wait", "--output", "json"],
        &tenant_env,
    );
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let job: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["site"], "shenzhen-qianhai", "{job}");
    let id = job["id"].as_str().unwrap();
    let out = baygrid(&["job", "logs", id], &tenant_env);
    assert_eq!(stdout(&out).trim(), "hello from 0");
    let out = baygrid(&["job", "get", id], &tenant_env);
    assert!(
        stdout(&out).contains("succeeded") && stdout(&out).contains("placed on qianhai-h800"),
        "{}",
        stdout(&out)
    );
    let out = baygrid(&["job", "ls"], &tenant_env);
    assert!(stdout(&out).contains(id));
    // newest first, a page at a time: a full page says how to ask for the next
    let out = baygrid(
        &["job", "ls", "--limit", "1", "--output", "json"],
        &tenant_env,
    );
    let newest: Vec<Value> = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(newest.len(), 1);
    assert_eq!(newest[0]["id"], id);
    let out = baygrid(&["job", "ls", "--limit", "1"], &tenant_env);
    assert!(
        stderr(&out).contains(&format!("more may follow: baygrid job ls --before {id}")),
        "{}",
        stderr(&out)
    );
    let out = baygrid(
        &["job", "ls", "--before", id, "--output", "json"],
        &tenant_env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).contains(id), "{}", stdout(&out));
    let out = baygrid(&["job", "ls", "--limit", "0"], &tenant_env);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("limit"), "{}", stderr(&out));
    // cancelling a job that has succeeded cancels nothing, and says so
    let out = baygrid(&["job", "cancel", id], &tenant_env);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("nothing to cancel; it had already succeeded"),
        "{}",
        stderr(&out)
    );

    // bad input: a non-zero exit and a message naming the field
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "name: bad\nresources: {nodes: two}\ncommand: x\nestimated_duration: 1m\n",
    )
    .unwrap();
    let out = baygrid(&["job", "submit", bad.to_str().unwrap()], &tenant_env);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("resources.nodes"), "{}", stderr(&out));
    std::fs::write(
        &bad,
        "name: huge\nresources: {accelerators: {H800: 64}}\ncommand: x\nestimated_duration: 1m\n",
    )
    .unwrap();
    let out = baygrid(&["job", "submit", bad.to_str().unwrap()], &tenant_env);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no cluster can ever hold"),
        "{}",
        stderr(&out)
    );
    let out = baygrid(&["job", "submit", "/nonexistent.yaml"], &tenant_env);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot read"), "{}", stderr(&out));
    let out = baygrid(
        &["tenant", "add", "x", "--party", "p", "--budget", "5"],
        &operator_env,
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("budget") || stderr(&out).contains("amount"),
        "{}",
        stderr(&out)
    );
    // the wrong role
    let out = baygrid(&["token", "ls"], &tenant_env);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("forbidden"), "{}", stderr(&out));

    // cancel a running job from the CLI
    std::fs::write(&spec, "name: sleeper\nresources: {accelerators: {A800: 1}}\ncommand: sleep 60\nestimated_duration: 2m\n").unwrap();
    let out = baygrid(
        &["job", "submit", spec_arg, "--output", "json"],
        &tenant_env,
    );
    let job: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    for _ in 0..100 {
        let out = baygrid(&["job", "get", &id, "--output", "json"], &tenant_env);
        let job: Value = serde_json::from_str(&stdout(&out)).unwrap();
        if job["state"] == "running" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = baygrid(&["job", "cancel", &id], &tenant_env);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut state = String::new();
    for _ in 0..100 {
        let out = baygrid(&["job", "get", &id, "--output", "json"], &tenant_env);
        let job: Value = serde_json::from_str(&stdout(&out)).unwrap();
        state = job["state"].as_str().unwrap().to_string();
        if state == "cancelled" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(state, "cancelled");
    // a repeated cancel (its first answer lost, say) succeeds
    let out = baygrid(&["job", "cancel", &id], &tenant_env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("already ended (now cancelled)"),
        "{}",
        stdout(&out)
    );

    a_statement_spans_pages(&server, &data, &operator_env);
    audit_export_and_verify(dir.path(), &operator_env, &tenant_env);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(up.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = up.wait().unwrap();
    assert!(status.success(), "up exits cleanly on SIGTERM");
}

/// More transfers than a page of a statement holds: `ledger statement` prints every one
/// once, and lines that add up to the net of the whole period, which is the balance.
fn a_statement_spans_pages(server: &str, data: &std::path::Path, operator_env: &[(&str, &str)]) {
    const DEPOSITS: usize = 1_001;
    let token = std::fs::read_to_string(data.join("operator.token")).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let operator = baygrid_api::Client::new(server, Some(token.trim().to_string()));
        let ids: Vec<usize> = (0..DEPOSITS).collect();
        for chunk in ids.chunks(100) {
            let posts = chunk.iter().map(|i| {
                let operator = operator.clone();
                let body = serde_json::json!({
                    "account": "wallet:sz-robotics",
                    "amount": "0.01 CNY",
                    "id": format!("page-{i}"),
                });
                async move {
                    operator
                        .post::<_, Value>("/api/v1/ledger/deposits", &body)
                        .await
                }
            });
            for posted in futures::future::join_all(posts).await {
                posted.unwrap();
            }
        }
    });
    let fen = |money: &Value| -> i64 {
        let text = money
            .as_str()
            .unwrap()
            .trim_end_matches(" CNY")
            .replace('.', "");
        text.parse().unwrap()
    };
    let out = baygrid(
        &[
            "ledger",
            "statement",
            "wallet:sz-robotics",
            "--output",
            "json",
        ],
        operator_env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let statement: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(statement.get("next").is_none());
    let lines = statement["lines"].as_array().unwrap();
    let ids: std::collections::BTreeSet<&str> =
        lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), lines.len(), "a line listed twice");
    assert_eq!(
        ids.iter().filter(|id| id.contains("page-")).count(),
        DEPOSITS
    );
    let moved: i64 = lines.iter().map(|l| fen(&l["signed_amount"])).sum();
    assert_eq!(moved, fen(&statement["net"]));
    let out = baygrid(
        &[
            "ledger",
            "balance",
            "wallet:sz-robotics",
            "--output",
            "json",
        ],
        operator_env,
    );
    let balance: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        fen(&statement["net"]),
        fen(&balance["balance"]),
        "{balance}"
    );
    // the table ends with the net
    let out = baygrid(&["ledger", "statement", "wallet:sz-robotics"], operator_env);
    let last = stdout(&out).lines().last().unwrap_or_default().to_string();
    assert_eq!(last, format!("net {}", statement["net"].as_str().unwrap()));
}

/// A regulator's view: export the log, verify it offline, and see tampering caught.
fn audit_export_and_verify(
    dir: &std::path::Path,
    operator_env: &[(&str, &str)],
    tenant_env: &[(&str, &str)],
) {
    let out = baygrid(&["audit", "checkpoint"], tenant_env);
    assert!(!out.status.success(), "a tenant may not read the audit log");
    let out = baygrid(&["audit", "checkpoint"], operator_env);
    assert!(out.status.success(), "{}", stderr(&out));
    let first = stdout(&out);
    assert!(first.starts_with("baygrid.local/audit\n"), "{first}");
    let previous = dir.join("previous.checkpoint");
    std::fs::write(&previous, &first).unwrap();
    let out = baygrid(&["audit", "prove", "3"], operator_env);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("entry 3 is included"),
        "{}",
        stdout(&out)
    );

    // more decisions after the first checkpoint
    let out = baygrid(
        &[
            "party",
            "add",
            "late-party",
            "--jurisdiction",
            "HK",
            "--city",
            "hong-kong",
        ],
        operator_env,
    );
    assert!(out.status.success());
    std::thread::sleep(Duration::from_millis(1500));
    let export = dir.join("export");
    let out = baygrid(&["audit", "export", export.to_str().unwrap()], operator_env);
    assert!(out.status.success(), "{}", stderr(&out));
    let verify = |previous: Option<&std::path::Path>| {
        let mut args = vec!["audit", "verify", export.to_str().unwrap()];
        if let Some(p) = previous {
            args.push("--previous");
            args.push(p.to_str().unwrap());
        }
        baygrid(&args, &[])
    };
    let out = verify(Some(&previous));
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("consistent (append-only)") && stdout(&out).ends_with("OK\n"),
        "{}",
        stdout(&out)
    );

    let entries_path = export.join("entries.jsonl");
    let good = std::fs::read_to_string(&entries_path).unwrap();
    let lines: Vec<&str> = good.lines().collect();
    assert!(lines.len() > 10);
    // one flipped character in entry 5's payload
    let mut tampered: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    tampered[5] = tampered[5].replacen("\"actor\":\"", "\"actor\":\"X", 1);
    std::fs::write(&entries_path, tampered.join("\n") + "\n").unwrap();
    let out = verify(None);
    assert!(!out.status.success());
    assert!(stdout(&out).contains("FAIL: entry 5 "), "{}", stdout(&out));
    // a dropped entry
    let mut dropped: Vec<&str> = lines.clone();
    dropped.remove(7);
    std::fs::write(&entries_path, dropped.join("\n") + "\n").unwrap();
    let out = verify(None);
    assert!(!out.status.success());
    assert!(stdout(&out).contains("FAIL: entry 7"), "{}", stdout(&out));
    // two entries swapped
    let mut swapped: Vec<&str> = lines.clone();
    swapped.swap(2, 3);
    std::fs::write(&entries_path, swapped.join("\n") + "\n").unwrap();
    let out = verify(None);
    assert!(!out.status.success());
    assert!(stdout(&out).contains("FAIL: entry 2"), "{}", stdout(&out));
    // a rewritten checkpoint
    std::fs::write(&entries_path, &good).unwrap();
    let note = std::fs::read_to_string(export.join("checkpoint")).unwrap();
    let size: u64 = note.lines().nth(1).unwrap().parse().unwrap();
    std::fs::write(
        export.join("checkpoint"),
        note.replacen(&format!("\n{size}\n"), &format!("\n{}\n", size - 1), 1),
    )
    .unwrap();
    let out = verify(None);
    assert!(!out.status.success());
    assert!(
        stdout(&out).contains("FAIL: checkpoint"),
        "{}",
        stdout(&out)
    );
    std::fs::write(export.join("checkpoint"), &note).unwrap();
    assert!(verify(None).status.success());
    witness_refuses_a_fork(dir, operator_env);
}

/// A witness cosigns a growing log, and refuses another log that presents the same key with
/// a different history.
fn witness_refuses_a_fork(dir: &std::path::Path, operator_env: &[(&str, &str)]) {
    let server = operator_env
        .iter()
        .find(|(k, _)| *k == "BAYGRID_SERVER")
        .unwrap()
        .1;
    let data = std::path::PathBuf::from(
        operator_env
            .iter()
            .find(|(k, _)| *k == "BAYGRID_DATA_DIR")
            .unwrap()
            .1,
    );
    let key = dir.join("witness.key");
    let key_arg = key.to_str().unwrap();
    let out = baygrid(
        &["audit", "witness", "--log", server, "--key", key_arg],
        operator_env,
    );
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("cosigned"), "{}", stdout(&out));
    assert_eq!(
        stdout(&out).matches("\u{2014} ").count(),
        2,
        "log signature and cosignature: {}",
        stdout(&out)
    );
    let out = baygrid(
        &[
            "party",
            "add",
            "later-party",
            "--jurisdiction",
            "MO",
            "--city",
            "macao",
        ],
        operator_env,
    );
    assert!(out.status.success());
    std::thread::sleep(Duration::from_millis(1500));
    let out = baygrid(
        &["audit", "witness", "--log", server, "--key", key_arg],
        operator_env,
    );
    assert!(
        out.status.success(),
        "the grown log is consistent: {}{}",
        stdout(&out),
        stderr(&out)
    );

    // another server holding the same log key, with a history of its own
    let fork_data = dir.join("fork-data");
    std::fs::create_dir_all(&fork_data).unwrap();
    std::fs::copy(data.join("audit.key"), fork_data.join("audit.key")).unwrap();
    let config = dir.join("fork.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nsites_file = \"sample\"\n",
            fork_data.display()
        ),
    )
    .unwrap();
    let (mut fork, fork_url) = spawn_server(&config, &dir.join("fork.log"));
    std::thread::sleep(Duration::from_millis(1500));
    let fork_env = [
        ("BAYGRID_SERVER", fork_url.as_str()),
        ("BAYGRID_DATA_DIR", fork_data.to_str().unwrap()),
    ];
    let out = baygrid(
        &["audit", "witness", "--log", &fork_url, "--key", key_arg],
        &fork_env,
    );
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(stdout(&out).contains("REFUSED"), "{}", stdout(&out));
    let _ = fork.kill();
    let _ = fork.wait();
}

#[test]
fn rules_decide_explains_a_flow_and_refuses_a_bad_request() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/flows/sz-clinic-to-hk-lab.toml"
    );
    let out = baygrid(&["rules", "decide", example, "--output", "json"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let decision: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(decision["allowed"], true);
    assert!(decision["rules"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r == "GBA-SC"));
    let filing = decision["obligations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["id"] == "file-standard-contract")
        .unwrap();
    assert_eq!(filing["due"], "2026-12-09");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"today": "2026-11-28", "exporter": {"name": "x"}}"#,
    )
    .unwrap();
    let out = baygrid(&["rules", "decide", bad.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("exporter"), "{}", stderr(&out));
    let out = baygrid(&["rules", "ls"], &[]);
    assert!(stdout(&out).contains("MO-ADEQUATE"));
}

#[test]
fn rules_check_runs_the_pack_cases_and_fails_on_a_mismatch() {
    let cases = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../baygrid-rules/pack/cases.toml"
    );
    let out = baygrid(&["rules", "check", cases, "--output", "json"], &[]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let results: Vec<Value> = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(results.len(), 27);
    assert!(results.iter().all(|r| r["matches"] == true));
    for key in ["id", "decision", "rules", "obligations", "matches"] {
        assert!(results[0].get(key).is_some(), "no {key}");
    }
    // flip one expectation: the command says so and exits non-zero
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(cases).unwrap().replacen(
        r#"expect = { decision = "allow", rules = ["CN-NOPI"]"#,
        r#"expect = { decision = "deny", rules = ["CN-NOPI"]"#,
        1,
    );
    let flipped = dir.path().join("flipped.toml");
    std::fs::write(&flipped, text).unwrap();
    let out = baygrid(&["rules", "check", flipped.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(stdout(&out).contains("MISMATCH"), "{}", stdout(&out));
}

#[test]
fn sim_pack_compares_policies_on_a_trace_and_names_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = dir.path().join("nodes.csv");
    let tasks = dir.path().join("tasks.csv");
    std::fs::write(
        &nodes,
        "sn,cpu_milli,memory_mib,gpu,model\na,96000,393216,8,G2\nb,64000,262144,2,T4\n",
    )
    .unwrap();
    std::fs::write(
        &tasks,
        "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\n\
         p0,12000,16384,1,1000,\np1,6000,12288,1,460,\np2,4000,8192,2,1000,T4\np3,2000,4096,0,0,\n",
    )
    .unwrap();
    let (nodes, tasks) = (nodes.to_str().unwrap(), tasks.to_str().unwrap());
    let args = [
        "sim",
        "--mode",
        "pack",
        "--nodes",
        nodes,
        "--trace",
        tasks,
        "--seeds",
        "1-3",
        "--policy",
        "bestfit,fgd,baygrid",
        "--output",
        "json",
    ];
    let out = baygrid(&args, &[]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let reports: Vec<Value> = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(reports.len(), 3);
    for report in &reports {
        for key in ["alloc_at_100", "alloc_at_130", "failed_tasks"] {
            assert!(report[key].is_number(), "{key} in {report}");
        }
        assert_eq!(report["runs"].as_array().unwrap().len(), 3);
    }
    // the same seeds give the same figures
    let again: Vec<Value> = serde_json::from_str(&stdout(&baygrid(&args, &[]))).unwrap();
    for (a, b) in reports.iter().zip(&again) {
        assert_eq!(a["runs"], b["runs"]);
    }

    let bad = baygrid(
        &[
            "sim", "--mode", "pack", "--nodes", nodes, "--trace", tasks, "--seed", "1", "--policy",
            "worstfit",
        ],
        &[],
    );
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("unknown pack policy `worstfit`"),
        "{}",
        stderr(&bad)
    );
    let bad = baygrid(
        &[
            "sim", "--mode", "pack", "--nodes", tasks, "--trace", tasks, "--seed", "1",
        ],
        &[],
    );
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("lacks column `sn`"),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn sim_replay_runs_three_policies_with_the_bound_and_names_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let runtimes = dir.path().join("runtime.csv");
    std::fs::write(&runtimes, "runtime\n60\n600\n3600.5\n7200\n0\n").unwrap();
    let runtimes = runtimes.to_str().unwrap();
    let args = [
        "sim",
        "--mode",
        "replay",
        "--synthetic",
        "--load",
        "0.9",
        "--jobs",
        "300",
        "--seed",
        "3",
        "--runtimes",
        runtimes,
        "--policy",
        "baygrid,fifo-first-fit,greedy-cheapest",
        "--output",
        "json",
    ];
    let out = baygrid(&args, &[]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let reports: Vec<Value> = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(reports.len(), 3);
    for report in &reports {
        for key in [
            "policy",
            "jobs",
            "rejected",
            "makespan_s",
            "utilisation",
            "mean_wait_s",
            "p99_wait_s",
            "mean_completion_s",
            "total_cost_cny",
            "lower_bound_cny",
            "cost_to_lower_bound",
            "jain_fairness",
            "jain_fairness_arriving",
            "deadlines_missed",
            "decisions_per_s",
        ] {
            assert!(report.get(key).is_some(), "{key} missing in {report}");
        }
        assert_eq!(report["jobs"], 300);
        assert!(report["cost_to_lower_bound"].as_f64().unwrap() >= 1.0 - 1e-9);
    }
    let again: Vec<Value> = serde_json::from_str(&stdout(&baygrid(&args, &[]))).unwrap();
    for (a, b) in reports.iter().zip(&again) {
        assert_eq!(a["total_cost_cny"], b["total_cost_cny"]);
        assert_eq!(a["mean_wait_s"], b["mean_wait_s"]);
    }
    // a trace of our own
    let trace = dir.path().join("jobs.csv");
    std::fs::write(
        &trace,
        "arrival_s,accelerators,nodes,accepts,duration_s,tenant,latency_sensitive,jurisdictions,deadline_s\n\
         0,16,2,nvidia,3600,alpha,false,,\n5,1,1,ascend,60,beta,false,HK,\n\
         9,8,1,any,7200,alpha,false,,100\n",
    )
    .unwrap();
    let out = baygrid(
        &[
            "sim",
            "--mode",
            "replay",
            "--trace",
            trace.to_str().unwrap(),
            "--seed",
            "1",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // the Ascend job that must stay in Hong Kong, and the one due before it could end
    assert!(
        stdout(&out).contains("2 rejected as never feasible"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("can end it by its deadline (100 s"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("deadlines missed"),
        "{}",
        stdout(&out)
    );

    let bad = baygrid(
        &[
            "sim",
            "--mode",
            "replay",
            "--synthetic",
            "--jobs",
            "10",
            "--seed",
            "1",
        ],
        &[],
    );
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("--load L is required"),
        "{}",
        stderr(&bad)
    );
    // ten synthetic jobs with `extra` flags: refused, saying `message`
    let refused = |extra: &[&str], message: &str| {
        let mut args = vec![
            "sim",
            "--mode",
            "replay",
            "--synthetic",
            "--jobs",
            "10",
            "--seed",
            "1",
            "--runtimes",
            runtimes,
        ];
        args.extend_from_slice(extra);
        let bad = baygrid(&args, &[]);
        assert!(!bad.status.success());
        assert!(stderr(&bad).contains(message), "{}", stderr(&bad));
    };
    refused(&["--load=-1"], "`load`");
    refused(
        &["--load", "0.5", "--patience-saving", "1"],
        "--patience-saving: 1 must be from 0 up to",
    );
    // preemptible batch jobs on an oversubscribed region: evictions, each requeued once
    let preempting = |share: &str| {
        baygrid(
            &[
                "sim",
                "--mode",
                "replay",
                "--synthetic",
                "--load",
                "8",
                "--jobs",
                "1000",
                "--preemption-wait-s",
                "0",
                "--seed",
                "11",
                "--runtimes",
                runtimes,
                "--preemptible",
                share,
                "--output",
                "json",
            ],
            &[],
        )
    };
    let out = preempting("0.5");
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(report["preemptions"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["preemptions"], report["requeues"]);
    let bad = preempting("1.5");
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("`preemptible`: 1.5 must be from 0 to 1"),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn fusion_eval_reproduces_fate_and_names_bad_input() {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/fusion");
    let out = baygrid(
        &[
            "fusion",
            "eval",
            &format!("{examples}/breast-hetero-lr.yaml"),
            "--output",
            "json",
        ],
        &[],
    );
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["psi"]["intersection"], 569);
    assert_eq!(report["psi"]["matches_plain"], true);
    let auc = report["results"][0]["scores"]["auc"].as_f64().unwrap();
    assert!((auc - 0.975186).abs() <= 0.005, "train AUC {auc}");
    assert_eq!(report["results"][0]["model"], "federated");
    // progress per iteration on stderr
    assert!(stderr(&out).contains("iteration   5"), "{}", stderr(&out));

    let out = baygrid(
        &["fusion", "eval", &format!("{examples}/breast-homo-lr.yaml")],
        &[],
    );
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("secure aggregation needs at least 3"),
        "{}",
        stdout(&out)
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        format!(
            "task: homo-lr\nparties:\n  - name: a\n    file: {examples}/../../../shared/data/fate/breast_homo_guest.csv\nsettings:\n  rounds: 3\n  learning_rat: 0.1\n"
        ),
    )
    .unwrap();
    let out = baygrid(&["fusion", "eval", bad.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("learning_rat"), "{}", stderr(&out));
    std::fs::write(&bad, "task: vertical-boost\nparties: []\n").unwrap();
    let out = baygrid(&["fusion", "eval", bad.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("task"), "{}", stderr(&out));
    // a run file for the exchange is checked before anything is sent
    std::fs::write(
        &bad,
        "task: homo-lr\nparties:\n  - name: a\n    dataset: hk-breast-clinic\n    file: x.csv\n",
    )
    .unwrap();
    let nowhere = [("BAYGRID_SERVER", "http://127.0.0.1:9")];
    let out = baygrid(&["fusion", "run", bad.to_str().unwrap()], &nowhere);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("parties[0]"), "{}", stderr(&out));
    let out = baygrid(&["fusion", "run", "no-such-run.yaml"], &nowhere);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no-such-run.yaml"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn datasets_are_registered_uploaded_and_read_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_arg = data.to_str().unwrap();
    let (mut up, server) = spawn_up(data_arg, &dir.path().join("up.log"));
    wait_healthy(&server, Duration::from_secs(30));
    let operator_env = [
        ("BAYGRID_SERVER", server.as_str()),
        ("BAYGRID_DATA_DIR", data_arg),
    ];
    let out = baygrid(
        &[
            "party",
            "add",
            "sz-lender",
            "--jurisdiction",
            "CN",
            "--city",
            "shenzhen",
        ],
        &operator_env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = baygrid(
        &[
            "token",
            "issue",
            "--role",
            "data_holder",
            "--subject",
            "sz-lender",
            "--output",
            "json",
        ],
        &operator_env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let issued: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let holder_env = [
        ("BAYGRID_SERVER", server.as_str()),
        ("BAYGRID_TOKEN", issued["token"].as_str().unwrap()),
    ];
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let spec = repo.join("examples/datasets/sz-credit-labels.yaml");
    // declared short of the table's 30,000 card holders
    let short = dir.path().join("sz-credit-labels.yaml");
    std::fs::write(
        &short,
        std::fs::read_to_string(&spec)
            .unwrap()
            .replace("subjects: 30000", "subjects: 25000"),
    )
    .unwrap();
    let out = baygrid(
        &["dataset", "register", short.to_str().unwrap()],
        &holder_env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("shenzhen-qianhai (CN)"),
        "{}",
        stdout(&out)
    );

    // a spec with a bad field, and a file that is not this dataset, are refused by name
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&spec)
            .unwrap()
            .replace("level: general", "level: secret"),
    )
    .unwrap();
    let out = baygrid(&["dataset", "register", bad.to_str().unwrap()], &holder_env);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("level"), "{}", stderr(&out));
    let fate = repo.join("../shared/data/fate");
    let wrong = fate.join("default_credit_hetero_host.csv");
    let out = baygrid(
        &[
            "dataset",
            "upload",
            "sz-credit-labels",
            wrong.to_str().unwrap(),
        ],
        &holder_env,
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("column 2"), "{}", stderr(&out));

    let table = fate.join("default_credit_hetero_guest.csv");
    let out = baygrid(
        &[
            "dataset",
            "upload",
            "sz-credit-labels",
            table.to_str().unwrap(),
            "--output",
            "json",
        ],
        &holder_env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let version: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(version["version"], 1);
    assert_eq!(version["rows"], 30000);
    assert_eq!(version["subjects"], 30000);
    assert!(
        stderr(&out).contains("the files hold 30000 distinct `id` values, more than the 25000 individuals `sz-credit-labels` declares; the rules count 30000 from now on"),
        "{}",
        stderr(&out)
    );
    let digest = version["files"][0]["sha256"].as_str().unwrap().to_string();
    // the bytes are in the Shenzhen vault, under the upload
    let object = data
        .join("vaults/shenzhen-qianhai/datasets/sz-credit-labels/uploads")
        .join(version["upload"].as_str().unwrap())
        .join("default_credit_hetero_guest.csv");
    assert_eq!(
        std::fs::read(&object).unwrap(),
        std::fs::read(&table).unwrap()
    );

    // every role reads the catalog
    let out = baygrid(&["dataset", "get", "sz-credit-labels"], &operator_env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("version 1: 1 file(s), 30000 rows, 30000 individuals"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("30000 (declared 25000)"),
        "{}",
        stdout(&out)
    );
    let out = baygrid(&["dataset", "ls", "--output", "json"], &operator_env);
    let all: Vec<Value> = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(all[0]["versions"][0]["files"][0]["sha256"], digest.as_str());

    // an offer, and contracts the rules decide: a mainland copy is active at once (the
    // offer approves itself); a copy to Hong Kong is denied, exit 3, with the remedy
    let offer = repo.join("examples/data-offers/sz-credit-labels.yaml");
    let out = baygrid(
        &["data-offer", "publish", offer.to_str().unwrap()],
        &holder_env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = baygrid(&["data-offer", "ls"], &operator_env);
    assert!(stdout(&out).contains("200.00 CNY/GB"), "{}", stdout(&out));
    let tenant_token = std::fs::read_to_string(data.join("tokens/gz-ai-lab.token")).unwrap();
    let tenant_env = [
        ("BAYGRID_SERVER", server.as_str()),
        ("BAYGRID_TOKEN", tenant_token.trim()),
    ];
    let request = |site: &str| {
        baygrid(
            &[
                "contract",
                "request",
                "--offer",
                "sz-credit-labels-copy",
                "--mode",
                "copy",
                "--purpose",
                "credit_risk",
                "--site",
                site,
            ],
            &tenant_env,
        )
    };
    let out = request("shaoguan");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(": active"), "{}", stdout(&out));
    // the copy it allows: decided, moved by the Shenzhen agent, the tenant's dataset at
    // Shaoguan
    let out = baygrid(
        &[
            "flow",
            "request",
            "--dataset",
            "sz-credit-labels",
            "--to",
            "shaoguan",
            "--purpose",
            "credit_risk",
            "--wait",
        ],
        &tenant_env,
    );
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains(": done"), "{}", stdout(&out));
    let out = baygrid(
        &[
            "dataset",
            "get",
            "sz-credit-labels-shaoguan",
            "--output",
            "json",
        ],
        &tenant_env,
    );
    let copy: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(copy["holder"], "gz-ai-lab");
    assert_eq!(copy["versions"][0]["files"][0]["sha256"], digest.as_str());
    let out = request("hk-cyberport");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("denied by CN-CONSENT") && stdout(&out).contains("separate_consent"),
        "{}",
        stdout(&out)
    );
    // queries at the data: malformed SQL is refused naming `sql`; a tenant with no query
    // contract gets nothing
    let query = |sql: &str| {
        baygrid(
            &["query", "--dataset", "sz-credit-labels", "--sql", sql],
            &tenant_env,
        )
    };
    let out = query("SELECT COUNT(* FROM sz_credit_labels");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("sql: the SQL does not parse"),
        "{}",
        stderr(&out)
    );
    let out = query("SELECT COUNT(*) FROM sz_credit_labels");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no active query contract"),
        "{}",
        stderr(&out)
    );
    let out = baygrid(&["query", "ls", "--output", "json"], &tenant_env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "[]");
    let out = baygrid(&["obligations", "ls", "--status", "late"], &operator_env);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("status"), "{}", stderr(&out));
    let out = baygrid(&["obligations", "ls", "--output", "json"], &operator_env);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = request("atlantis");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("site"), "{}", stderr(&out));
    let out = baygrid(&["contract", "ls", "--output", "json"], &holder_env);
    let contracts: Vec<Value> = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(contracts.len(), 2);
    let active = contracts.iter().find(|c| c["state"] == "active").unwrap();
    let out = baygrid(
        &["contract", "revoke", active["id"].as_str().unwrap()],
        &holder_env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(": revoked"), "{}", stdout(&out));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(up.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(up.wait().unwrap().success(), "up exits cleanly on SIGTERM");
}

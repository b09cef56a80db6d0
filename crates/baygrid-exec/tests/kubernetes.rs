//! The Kubernetes engine against kube-rs's client over a mock API server that answers
//! with bodies in the API server's own format (tests/k8s/): a Job create, list-and-watch
//! events through success and failure, pod logs, delete with propagation, nodes.
#![cfg(feature = "k8s")]

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baygrid_exec::kubernetes::{capacity_from_nodes, dns_label, quantity_bytes, MANAGED_BY};
use baygrid_exec::{
    Engine, ExecError, Folder, JobStatus, KubernetesConfig, KubernetesEngine, LaunchSpec,
    LogCursor, WorkVolume,
};
use http::{Request, Response, StatusCode};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};

#[derive(Default)]
struct ApiState {
    /// (namespace, name) → Job object.
    jobs: BTreeMap<(String, String), Value>,
    namespaces: Vec<String>,
    /// Watch event batches, one per watch request; later watches hang.
    watches: VecDeque<Vec<Value>>,
    pods: BTreeMap<String, Value>,
    logs: BTreeMap<String, String>,
    requests: Vec<(String, String, String)>,
    resource_version: u64,
    events: Vec<Value>,
}

type Shared = Arc<Mutex<ApiState>>;

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    let body = json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
        "message": message, "reason": reason, "code": code});
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

fn ok(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

async fn serve(state: Shared, req: Request<Body>) -> Response<Body> {
    let method = req.method().to_string();
    let uri = req.uri().clone();
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or("").to_string();
    let body = req.into_body().collect_bytes().await.unwrap_or_default();
    let body = String::from_utf8_lossy(&body).to_string();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let watch = query.contains("watch=true");
    {
        let mut s = state.lock().unwrap();
        s.requests
            .push((method.clone(), format!("{path}?{query}"), body.clone()));
    }
    match (method.as_str(), parts.as_slice()) {
        ("GET", ["apis", "batch", "v1", "jobs"]) if watch => {
            let next = state.lock().unwrap().watches.pop_front();
            match next {
                Some(events) => {
                    let mut text = Vec::new();
                    for e in events {
                        text.extend(serde_json::to_vec(&e).unwrap());
                        text.push(b'\n');
                    }
                    Response::builder()
                        .status(200)
                        .header("content-type", "application/json")
                        .body(Body::from(text))
                        .unwrap()
                }
                None => std::future::pending().await,
            }
        }
        ("GET", ["apis", "batch", "v1", "jobs"]) => {
            let s = state.lock().unwrap();
            let items: Vec<Value> = s.jobs.values().cloned().collect();
            ok(
                200,
                &json!({"kind":"JobList","apiVersion":"batch/v1",
                    "metadata":{"resourceVersion": s.resource_version.to_string()},"items": items}),
            )
        }
        // The pod reflector: list every pod the test holds; its watch stays open.
        ("GET", ["api", "v1", "pods"]) if watch => std::future::pending().await,
        ("GET", ["api", "v1", "pods"]) => {
            let s = state.lock().unwrap();
            let items: Vec<Value> = s
                .pods
                .values()
                .flat_map(|l| l["items"].as_array().cloned().unwrap_or_default())
                .collect();
            ok(
                200,
                &json!({"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"300"},"items":items}),
            )
        }
        ("POST", ["api", "v1", "namespaces"]) => {
            let ns: Value = serde_json::from_str(&body).unwrap();
            let name = ns["metadata"]["name"].as_str().unwrap().to_string();
            let mut s = state.lock().unwrap();
            if s.namespaces.contains(&name) {
                return status(
                    409,
                    "AlreadyExists",
                    &format!("namespaces \"{name}\" already exists"),
                );
            }
            s.namespaces.push(name);
            ok(201, &ns)
        }
        ("POST", ["apis", "batch", "v1", "namespaces", ns, "jobs"]) => {
            let mut job: Value = serde_json::from_str(&body).unwrap();
            let name = job["metadata"]["name"].as_str().unwrap().to_string();
            let mut s = state.lock().unwrap();
            if s.jobs.contains_key(&(ns.to_string(), name.clone())) {
                return status(
                    409,
                    "AlreadyExists",
                    &format!("jobs.batch \"{name}\" already exists"),
                );
            }
            s.resource_version += 1;
            job["metadata"]["uid"] = json!("3c9e1f1e-2a8d-4e0b-b6e6-1f0d4b1a9c77");
            job["metadata"]["resourceVersion"] = json!(s.resource_version.to_string());
            job["metadata"]["creationTimestamp"] = json!("2026-11-28T10:02:10Z");
            job["metadata"]["generation"] = json!(1);
            job["status"] = json!({});
            s.jobs.insert((ns.to_string(), name), job.clone());
            ok(201, &job)
        }
        ("GET", ["apis", "batch", "v1", "namespaces", ns, "jobs", name]) => {
            let s = state.lock().unwrap();
            match s.jobs.get(&(ns.to_string(), name.to_string())) {
                Some(j) => ok(200, j),
                None => status(404, "NotFound", &format!("jobs.batch \"{name}\" not found")),
            }
        }
        ("DELETE", ["apis", "batch", "v1", "namespaces", ns, "jobs", name]) => {
            let mut s = state.lock().unwrap();
            match s.jobs.remove(&(ns.to_string(), name.to_string())) {
                Some(j) => ok(200, &j),
                None => status(404, "NotFound", &format!("jobs.batch \"{name}\" not found")),
            }
        }
        ("POST", ["api", "v1", "namespaces", _ns, "services"]) => {
            let svc: Value = serde_json::from_str(&body).unwrap();
            ok(201, &svc)
        }
        ("GET", ["api", "v1", "namespaces", _ns, "pods"]) => {
            let s = state.lock().unwrap();
            let job = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("labelSelector="))
                .map(|v| v.replace("%2F", "/").replace("%3D", "="))
                .and_then(|sel| sel.split('=').nth(1).map(str::to_string))
                .unwrap_or_default();
            ok(
                200,
                s.pods.get(&job).unwrap_or(
                    &json!({"kind":"PodList","apiVersion":"v1","metadata":{},"items":[]}),
                ),
            )
        }
        ("GET", ["api", "v1", "namespaces", _ns, "pods", pod, "log"]) => {
            let s = state.lock().unwrap();
            Response::builder()
                .status(200)
                .header("content-type", "text/plain")
                .body(Body::from(
                    s.logs.get(*pod).cloned().unwrap_or_default().into_bytes(),
                ))
                .unwrap()
        }
        ("GET", ["api", "v1", "namespaces", _ns, "events"]) => {
            let s = state.lock().unwrap();
            ok(
                200,
                &json!({"kind":"EventList","apiVersion":"v1","metadata":{"resourceVersion":"400"},
                "items": s.events.clone()}),
            )
        }
        ("GET", ["api", "v1", "nodes"]) => {
            let nodes: Value = serde_json::from_str(include_str!("k8s/nodes.json")).unwrap();
            ok(200, &nodes)
        }
        ("POST", ["apis", "networking.k8s.io", "v1", "namespaces", ns, "networkpolicies"]) => {
            let policy: Value = serde_json::from_str(&body).unwrap();
            let key = format!("{ns}/{}", policy["metadata"]["name"].as_str().unwrap());
            let mut s = state.lock().unwrap();
            if s.namespaces.contains(&key) {
                return status(409, "AlreadyExists", &format!("{key} already exists"));
            }
            s.namespaces.push(key);
            ok(201, &policy)
        }
        _ => status(404, "NotFound", &format!("no route for {method} {path}")),
    }
}

fn engine(state: &Shared, config: KubernetesConfig) -> (KubernetesEngine, tempfile::TempDir) {
    let state = state.clone();
    let service = tower::service_fn(move |req: Request<Body>| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(serve(state, req).await) }
    });
    let client = Client::new(service, "default");
    let dir = tempfile::tempdir().unwrap();
    (
        KubernetesEngine::with_client(client, config, dir.path().to_path_buf()),
        dir,
    )
}

fn spec(nodes: u32, model: &str) -> LaunchSpec {
    LaunchSpec {
        job_id: "job_01JDZ3K4".into(),
        tenant: "HK Hospital".into(),
        epoch: 2,
        command: "python train.py".into(),
        env: BTreeMap::from([("EPOCHS".to_string(), "3".to_string())]),
        image: Some("registry.local/train:1.2".into()),
        nodes,
        node_indices: (0..nodes).collect(),
        accelerator: Some(model.into()),
        accelerators_per_node: 8,
        cpus_per_node: 32,
        memory_gb_per_node: 256,
        time_limit: Some(Duration::from_secs(3600)),
        held: Some(Duration::from_secs(4000)),
        no_network: false,
        folders: vec![],
    }
}

fn requests(state: &Shared, method: &str, fragment: &str) -> Vec<String> {
    state
        .lock()
        .unwrap()
        .requests
        .iter()
        .filter(|(m, p, _)| m == method && p.contains(fragment))
        .map(|(_, _, b)| b.clone())
        .collect()
}

#[tokio::test]
async fn a_job_without_network_gets_a_deny_all_policy_before_its_pods() {
    let state = Shared::default();
    let (protected, _dir) = engine(&state, KubernetesConfig::default());
    let mut isolated = spec(1, "H800");
    isolated.no_network = true;
    protected.launch(&isolated).await.unwrap();
    // a second protected job in the namespace finds the policy there
    isolated.job_id = "job_01jdz3k4second".into();
    protected.launch(&isolated).await.unwrap();
    let order: Vec<String> = state
        .lock()
        .unwrap()
        .requests
        .iter()
        .filter(|(m, _, _)| m == "POST")
        .map(|(_, p, _)| p.split('?').next().unwrap().to_string())
        .collect();
    let policy_at = order
        .iter()
        .position(|p| p.ends_with("/networkpolicies"))
        .unwrap();
    let job_at = order.iter().position(|p| p.ends_with("/jobs")).unwrap();
    assert!(policy_at < job_at, "{order:?}");
    let policies = requests(
        &state,
        "POST",
        "/namespaces/baygrid-hk-hospital/networkpolicies",
    );
    assert_eq!(policies.len(), 2);
    let policy: Value = serde_json::from_str(&policies[0]).unwrap();
    assert_eq!(policy["metadata"]["name"], "baygrid-no-network");
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"]["baygrid.io/network"],
        "none"
    );
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    assert!(policy["spec"].get("ingress").is_none() && policy["spec"].get("egress").is_none());
    let job: Value =
        serde_json::from_str(&requests(&state, "POST", "/namespaces/baygrid-hk-hospital/jobs")[0])
            .unwrap();
    assert_eq!(
        job["spec"]["template"]["metadata"]["labels"]["baygrid.io/network"],
        "none"
    );
    // a job that may use the network makes no policy and carries no such label
    let state = Shared::default();
    let (connected, _dir) = engine(&state, KubernetesConfig::default());
    connected.launch(&spec(1, "H800")).await.unwrap();
    assert!(requests(&state, "POST", "networkpolicies").is_empty());
    let job: Value = serde_json::from_str(&requests(&state, "POST", "/jobs")[0]).unwrap();
    assert!(job["spec"]["template"]["metadata"]["labels"]
        .get("baygrid.io/network")
        .is_none());
}

#[tokio::test]
async fn launch_creates_an_indexed_gang_job_in_the_tenant_namespace() {
    let state = Shared::default();
    let (engine, _dir) = engine(&state, KubernetesConfig::default());
    let handle = engine.launch(&spec(2, "H800")).await.unwrap();
    assert_eq!(handle.engine, "kubernetes");
    assert_eq!(handle.detail["namespace"], "baygrid-hk-hospital");
    assert_eq!(handle.detail["name"], "bg-job-01jdz3k4-2");

    let created = requests(&state, "POST", "/namespaces/baygrid-hk-hospital/jobs");
    assert_eq!(created.len(), 1);
    let job: Value = serde_json::from_str(&created[0]).unwrap();
    let js = &job["spec"];
    assert_eq!(js["completionMode"], "Indexed");
    assert_eq!(js["completions"], 2);
    assert_eq!(js["parallelism"], 2);
    assert_eq!(js["backoffLimit"], 0);
    // 3600 s × 1.5 margin, but never past the 4000 s hold.
    assert_eq!(js["activeDeadlineSeconds"], 4000);
    assert_eq!(
        job["metadata"]["annotations"]["scheduling.volcano.sh/group-min-member"],
        "2"
    );
    assert_eq!(job["metadata"]["labels"][MANAGED_BY], "baygrid");
    let pod = &js["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    assert_eq!(pod["subdomain"], "bg-job-01jdz3k4-2");
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "registry.local/train:1.2");
    assert_eq!(c["command"], json!(["sh", "-c", "python train.py"]));
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "8");
    assert_eq!(c["resources"]["requests"]["cpu"], "32");
    assert_eq!(c["resources"]["limits"]["memory"], "256Gi");
    let env = c["env"].as_array().unwrap();
    let rank = env.iter().find(|e| e["name"] == "BAYGRID_RANK").unwrap();
    assert_eq!(
        rank["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    );
    assert!(env
        .iter()
        .any(|e| e["name"] == "EPOCHS" && e["value"] == "3"));
    assert!(env.iter().any(|e| e["name"] == "BAYGRID_MASTER_ADDR"
        && e["value"] == "bg-job-01jdz3k4-2-0.bg-job-01jdz3k4-2"));
    // The gang's headless Service is owned by the Job, so deleting the Job removes it.
    let svc: Value = serde_json::from_str(&requests(&state, "POST", "/services")[0]).unwrap();
    assert_eq!(svc["spec"]["clusterIP"], "None");
    assert_eq!(svc["metadata"]["ownerReferences"][0]["kind"], "Job");
    assert_eq!(
        svc["metadata"]["ownerReferences"][0]["uid"],
        "3c9e1f1e-2a8d-4e0b-b6e6-1f0d4b1a9c77"
    );

    // Launching again (an agent restarted mid-launch) adopts the existing Job.
    let again = engine.launch(&spec(2, "H800")).await.unwrap();
    assert_eq!(again.detail["name"], handle.detail["name"]);
}

#[tokio::test]
async fn ascend_models_ask_for_their_own_extended_resource() {
    let state = Shared::default();
    let (engine, _dir) = engine(&state, KubernetesConfig::default());
    // the sample region's model name, and the bare chip name
    for model in ["Ascend910B", "910B"] {
        let job = engine.job_object(&spec(1, model)).unwrap();
        let json = serde_json::to_value(&job).unwrap();
        let limits = &json["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"];
        assert_eq!(limits["huawei.com/Ascend910"], "8", "{model}");
        assert!(limits.get("nvidia.com/gpu").is_none(), "{model}");
    }
}

fn with_folders() -> LaunchSpec {
    LaunchSpec {
        folders: vec![
            Folder {
                path: "/var/lib/baygrid/hk/inputs/job_01jdz3k4.2".into(),
                writable: false,
            },
            Folder {
                path: "/var/lib/baygrid/hk/outputs/job_01jdz3k4.2".into(),
                writable: true,
            },
        ],
        ..spec(1, "H800")
    }
}

#[tokio::test]
async fn a_job_with_folders_is_refused_without_a_work_volume_and_creates_nothing() {
    let state = Shared::default();
    let (engine, _dir) = engine(&state, KubernetesConfig::default());
    let err = engine.launch(&with_folders()).await.unwrap_err();
    assert!(matches!(err, ExecError::Refused(_)), "{err}");
    assert!(err.to_string().contains("work_volume"), "{err}");
    assert!(
        err.to_string()
            .contains("/var/lib/baygrid/hk/outputs/job_01jdz3k4.2"),
        "{err}"
    );
    assert!(requests(&state, "POST", "/jobs").is_empty());
}

#[tokio::test]
async fn folders_are_mounted_at_the_agents_paths_inputs_read_only() {
    let state = Shared::default();
    let config = KubernetesConfig {
        work_volume: Some(WorkVolume::HostPath),
        ..Default::default()
    };
    let (engine, _dir) = engine(&state, config);
    engine.launch(&with_folders()).await.unwrap();
    let job: Value = serde_json::from_str(&requests(&state, "POST", "/jobs")[0]).unwrap();
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(
        pod["volumes"],
        json!([
            {"name": "baygrid-folder-0", "hostPath":
                {"path": "/var/lib/baygrid/hk/inputs/job_01jdz3k4.2", "type": "Directory"}},
            {"name": "baygrid-folder-1", "hostPath":
                {"path": "/var/lib/baygrid/hk/outputs/job_01jdz3k4.2", "type": "Directory"}},
        ])
    );
    assert_eq!(
        pod["containers"][0]["volumeMounts"],
        json!([
            {"name": "baygrid-folder-0", "mountPath": "/var/lib/baygrid/hk/inputs/job_01jdz3k4.2",
                "readOnly": true},
            {"name": "baygrid-folder-1", "mountPath": "/var/lib/baygrid/hk/outputs/job_01jdz3k4.2",
                "readOnly": false},
        ])
    );

    // over NFS: one volume, each folder its path under the agent's mount point
    let nfs = KubernetesConfig {
        work_volume: Some(WorkVolume::Nfs {
            server: "nfs.hk.example".into(),
            path: "/exports/baygrid".into(),
            mounted_at: "/var/lib/baygrid".into(),
        }),
        ..Default::default()
    };
    let (engine, _dir) = self::engine(&Shared::default(), nfs.clone());
    let job = serde_json::to_value(engine.job_object(&with_folders()).unwrap()).unwrap();
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(
        pod["volumes"],
        json!([{"name": "baygrid-work", "nfs":
            {"server": "nfs.hk.example", "path": "/exports/baygrid"}}])
    );
    let mounts = &pod["containers"][0]["volumeMounts"];
    assert_eq!(mounts[0]["subPath"], "hk/inputs/job_01jdz3k4.2");
    assert_eq!(mounts[0]["readOnly"], true);
    assert_eq!(mounts[1]["subPath"], "hk/outputs/job_01jdz3k4.2");
    assert_eq!(
        mounts[1]["mountPath"],
        "/var/lib/baygrid/hk/outputs/job_01jdz3k4.2"
    );
    // a folder outside the mount cannot be shown to the pods
    let elsewhere = LaunchSpec {
        folders: vec![Folder {
            path: "/tmp/outputs".into(),
            writable: true,
        }],
        ..spec(1, "H800")
    };
    let err = engine.job_object(&elsewhere).unwrap_err();
    assert!(err.to_string().contains("outside the NFS mount"), "{err}");
    // a job without folders needs no volume
    let plain = serde_json::to_value(engine.job_object(&spec(1, "H800")).unwrap()).unwrap();
    assert!(plain["spec"]["template"]["spec"].get("volumes").is_none());
}

fn job_with(state: &Shared, name: &str, status: Value) -> Value {
    let ns = "baygrid-hk-hospital";
    let job = json!({"apiVersion":"batch/v1","kind":"Job",
        "metadata":{"name":name,"namespace":ns,"uid":format!("uid-{name}"),"resourceVersion":"200",
            "labels":{MANAGED_BY:"baygrid"}},
        "spec":{"completionMode":"Indexed","completions":2,"parallelism":2,"backoffLimit":0,
            "template":{"spec":{"restartPolicy":"Never","containers":[{"name":"main","image":"busybox:1.36"}]}}},
        "status": status});
    state
        .lock()
        .unwrap()
        .jobs
        .insert((ns.into(), name.into()), job.clone());
    job
}

fn handle_for(dir: &std::path::Path, name: &str) -> baygrid_exec::JobHandle {
    baygrid_exec::JobHandle {
        job_id: name.into(),
        epoch: 1,
        engine: "kubernetes".into(),
        dir: dir.join(name),
        detail: json!({"namespace":"baygrid-hk-hospital","name":name}),
    }
}

async fn wait_for(
    engine: &KubernetesEngine,
    h: &baygrid_exec::JobHandle,
    want: impl Fn(&JobStatus) -> bool,
) -> JobStatus {
    for _ in 0..200 {
        let s = engine.status(h).await.unwrap();
        if want(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    engine.status(h).await.unwrap()
}

#[tokio::test]
async fn the_watch_moves_jobs_through_success_and_failure() {
    let state = Shared::default();
    let running = json!({"active":2,"startTime":"2026-11-28T10:02:10Z","ready":2,"terminating":0,"uncountedTerminatedPods":{}});
    let mut ok_job = job_with(&state, "bg-ok-1", running.clone());
    let mut bad_job = job_with(&state, "bg-bad-1", running);
    state.lock().unwrap().resource_version = 200;
    ok_job["metadata"]["resourceVersion"] = json!("201");
    ok_job["status"] = json!({"startTime":"2026-11-28T10:02:10Z","completionTime":"2026-11-28T10:04:41Z",
        "succeeded":2,"completedIndexes":"0-1","ready":0,"terminating":0,"uncountedTerminatedPods":{},
        "conditions":[
          {"type":"SuccessCriteriaMet","status":"True","lastProbeTime":"2026-11-28T10:04:41Z","lastTransitionTime":"2026-11-28T10:04:41Z","reason":"CompletionsReached","message":"Reached expected number of succeeded pods"},
          {"type":"Complete","status":"True","lastProbeTime":"2026-11-28T10:04:41Z","lastTransitionTime":"2026-11-28T10:04:41Z","reason":"CompletionsReached","message":"Reached expected number of succeeded pods"}]});
    bad_job["metadata"]["resourceVersion"] = json!("202");
    bad_job["status"] = json!({"startTime":"2026-11-28T10:02:10Z","failed":2,"failedIndexes":"0-1","ready":0,"terminating":0,"uncountedTerminatedPods":{},
        "conditions":[
          {"type":"FailureTarget","status":"True","lastProbeTime":"2026-11-28T10:02:14Z","lastTransitionTime":"2026-11-28T10:02:14Z","reason":"BackoffLimitExceeded","message":"Job has reached the specified backoff limit"},
          {"type":"Failed","status":"True","lastProbeTime":"2026-11-28T10:02:16Z","lastTransitionTime":"2026-11-28T10:02:16Z","reason":"BackoffLimitExceeded","message":"Job has reached the specified backoff limit"}]});
    let pods = include_str!("k8s/pods-failed.json")
        .replace("JOBNAME", "bg-bad-1")
        .replace("NAMESPACE", "baygrid-hk-hospital");
    {
        let mut s = state.lock().unwrap();
        s.watches.push_back(vec![
            json!({"type":"MODIFIED","object": ok_job}),
            json!({"type":"MODIFIED","object": bad_job}),
        ]);
        s.pods
            .insert("bg-bad-1".into(), serde_json::from_str(&pods).unwrap());
        // The API's own view no longer answers GETs: only the watch carries the news.
        s.jobs.clear();
    }
    let (engine, dir) = engine(&state, KubernetesConfig::default());
    let ok_status = wait_for(&engine, &handle_for(dir.path(), "bg-ok-1"), |s| {
        *s == JobStatus::Succeeded
    })
    .await;
    assert_eq!(ok_status, JobStatus::Succeeded);
    let bad = wait_for(&engine, &handle_for(dir.path(), "bg-bad-1"), |s| {
        matches!(s, JobStatus::Failed { .. })
    })
    .await;
    match bad {
        JobStatus::Failed { exit_code, reason } => {
            // The first pod to fail is the cause; the sibling's 137 is the controller's kill.
            assert_eq!(exit_code, Some(3), "{reason}");
            assert!(reason.contains("BackoffLimitExceeded"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!requests(&state, "GET", "watch=true").is_empty());
    assert!(!requests(
        &state,
        "GET",
        "labelSelector=app.kubernetes.io%2Fmanaged-by%3Dbaygrid"
    )
    .is_empty());
}

#[tokio::test]
async fn deadline_and_eviction_are_told_apart() {
    let state = Shared::default();
    let (engine, dir) = engine(&state, KubernetesConfig::default());
    job_with(
        &state,
        "bg-late-1",
        json!({"failed":1,"conditions":[
        {"type":"Failed","status":"True","reason":"DeadlineExceeded","message":"Job was active longer than specified deadline"}]}),
    );
    match engine
        .status(&handle_for(dir.path(), "bg-late-1"))
        .await
        .unwrap()
    {
        JobStatus::Failed { reason, .. } => assert!(reason.contains("time limit"), "{reason}"),
        other => panic!("{other:?}"),
    }
    job_with(
        &state,
        "bg-evicted-1",
        json!({"failed":1,"conditions":[
        {"type":"Failed","status":"True","reason":"BackoffLimitExceeded","message":"Job has reached the specified backoff limit"}]}),
    );
    state.lock().unwrap().pods.insert("bg-evicted-1".into(), json!({"kind":"PodList","apiVersion":"v1","metadata":{},"items":[
        {"metadata":{"name":"bg-evicted-1-0-abcde","namespace":"baygrid-hk-hospital","annotations":{"batch.kubernetes.io/job-completion-index":"0"}},
         "status":{"phase":"Failed","reason":"Evicted","message":"The node was low on resource: memory.",
           "conditions":[{"type":"DisruptionTarget","status":"True","reason":"TerminationByKubelet","message":"The node was low on resource: memory."}]}}]}));
    match engine
        .status(&handle_for(dir.path(), "bg-evicted-1"))
        .await
        .unwrap()
    {
        JobStatus::Lost { reason } => assert!(reason.contains("TerminationByKubelet"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // A Job that is gone without a cancel is lost.
    match engine
        .status(&handle_for(dir.path(), "bg-never-1"))
        .await
        .unwrap()
    {
        JobStatus::Lost { reason } => assert!(reason.contains("gone"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_image_that_cannot_be_pulled_fails_the_job_in_kubernetes_words() {
    let state = Shared::default();
    let (engine, dir) = engine(&state, KubernetesConfig::default());
    job_with(&state, "bg-pull-1", json!({"active":1,"ready":0}));
    state.lock().unwrap().pods.insert("bg-pull-1".into(), json!({"kind":"PodList","apiVersion":"v1","metadata":{},"items":[
        {"metadata":{"name":"bg-pull-1-0-k2j4x","namespace":"baygrid-hk-hospital","uid":"p-1",
            "labels":{"batch.kubernetes.io/job-name":"bg-pull-1"},
            "annotations":{"batch.kubernetes.io/job-completion-index":"0"}},
         "status":{"phase":"Pending","containerStatuses":[{"name":"main","ready":false,"restartCount":0,
            "image":"registry.local/train:9.9","imageID":"","started":false,
            "state":{"waiting":{"reason":"ImagePullBackOff",
              "message":"Back-off pulling image \"registry.local/train:9.9\": ErrImagePull: failed to pull and unpack image \"registry.local/train:9.9\": not found"}}}]}}]}));
    match engine
        .status(&handle_for(dir.path(), "bg-pull-1"))
        .await
        .unwrap()
    {
        JobStatus::Failed { reason, exit_code } => {
            assert_eq!(exit_code, None);
            assert!(
                reason.contains("ImagePullBackOff") && reason.contains("not found"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(requests(&state, "DELETE", "/jobs/bg-pull-1").len(), 1);

    // A quota that forbids the pods: the Job has none, and the controller's event says why.
    job_with(&state, "bg-quota-1", json!({"active":0}));
    state.lock().unwrap().events.push(json!({"metadata":{"name":"bg-quota-1.1813f","namespace":"baygrid-hk-hospital"},
        "involvedObject":{"kind":"Job","namespace":"baygrid-hk-hospital","name":"bg-quota-1","apiVersion":"batch/v1"},
        "reason":"FailedCreate","type":"Warning","count":3,
        "message":"Error creating: pods \"bg-quota-1-0-8x2lq\" is forbidden: exceeded quota: gpu-quota, requested: requests.nvidia.com/gpu=8, used: requests.nvidia.com/gpu=16, limited: requests.nvidia.com/gpu=16",
        "source":{"component":"job-controller"}}));
    match engine
        .status(&handle_for(dir.path(), "bg-quota-1"))
        .await
        .unwrap()
    {
        JobStatus::Failed { reason, .. } => {
            assert!(reason.contains("exceeded quota: gpu-quota"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn logs_are_read_per_rank_past_the_cursor() {
    let state = Shared::default();
    let (engine, dir) = engine(&state, KubernetesConfig::default());
    job_with(&state, "bg-logs-1", json!({"active":2}));
    let pod = |i: u32, phase: &str| {
        json!({"metadata":{"name":format!("bg-logs-1-{i}-zz{i}"),"namespace":"baygrid-hk-hospital",
        "annotations":{"batch.kubernetes.io/job-completion-index":i.to_string()}},"status":{"phase":phase}})
    };
    {
        let mut s = state.lock().unwrap();
        s.pods.insert("bg-logs-1".into(), json!({"kind":"PodList","apiVersion":"v1","metadata":{},"items":[pod(1,"Running"), pod(0,"Running")]}));
        s.logs.insert(
            "bg-logs-1-0-zz0".into(),
            "epoch 1 loss 0.69\nepoch 2 lo".into(),
        );
        s.logs
            .insert("bg-logs-1-1-zz1".into(), "rank 1 ready\n".into());
    }
    let h = handle_for(dir.path(), "bg-logs-1");
    let mut cursor = LogCursor::default();
    let first = read_until(&engine, &h, &mut cursor, 2).await;
    assert_eq!(
        first,
        vec![
            ("stdout".to_string(), "epoch 1 loss 0.69".to_string()),
            ("stdout.1".to_string(), "rank 1 ready".to_string()),
        ]
    );
    {
        let mut s = state.lock().unwrap();
        s.logs.insert(
            "bg-logs-1-0-zz0".into(),
            "epoch 1 loss 0.69\nepoch 2 loss 0.41\ndone".into(),
        );
        s.pods.insert(
            "bg-logs-1".into(),
            json!({"kind":"PodList","apiVersion":"v1","metadata":{},"items":[pod(0,"Succeeded"), pod(1,"Succeeded")]}),
        );
    }
    // The follow stream ended while the pod ran (the API server closed it): it is
    // followed again, and the lines already read are not read twice.
    let second: Vec<String> = read_until(&engine, &h, &mut cursor, 2)
        .await
        .into_iter()
        .map(|(_, l)| l)
        .collect();
    assert_eq!(second, vec!["epoch 2 loss 0.41", "done"]);
    assert!(engine
        .read_output(&h, &mut cursor)
        .await
        .unwrap()
        .is_empty());
}

async fn read_until(
    engine: &KubernetesEngine,
    h: &baygrid_exec::JobHandle,
    cursor: &mut LogCursor,
    want: usize,
) -> Vec<(String, String)> {
    let mut got = Vec::new();
    for _ in 0..300 {
        for l in engine.read_output(h, cursor).await.unwrap() {
            got.push((l.stream, l.line));
        }
        if got.len() >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    got
}

#[tokio::test]
async fn cancel_deletes_the_job_with_propagation_then_reads_cancelled() {
    let state = Shared::default();
    let (engine, _dir) = engine(&state, KubernetesConfig::default());
    let handle = engine.launch(&spec(1, "H800")).await.unwrap();
    engine.cancel(&handle).await.unwrap();
    let deletes = requests(&state, "DELETE", "/jobs/bg-job-01jdz3k4-2");
    assert_eq!(deletes.len(), 1);
    let body: Value = serde_json::from_str(&deletes[0]).unwrap();
    assert_eq!(body["propagationPolicy"], "Background");
    let s = wait_for(&engine, &handle, |s| {
        matches!(s, JobStatus::Cancelled { .. })
    })
    .await;
    assert!(matches!(s, JobStatus::Cancelled { .. }), "{s:?}");
    // Cancelling twice is harmless.
    engine.cancel(&handle).await.unwrap();
}

#[tokio::test]
async fn capacity_comes_from_ready_schedulable_accelerator_nodes() {
    let state = Shared::default();
    let (engine, _dir) = engine(&state, KubernetesConfig::default());
    let cap = engine.capacity().await.unwrap().unwrap();
    // a and b count; c is not Ready, d is cordoned, e has no GPUs.
    assert_eq!(cap.nodes, 2);
    assert_eq!(cap.accelerators_per_node, 8);
    assert_eq!(cap.cpus_per_node, 96);
    assert_eq!(cap.memory_gb_per_node, 990);
    let nodes: Vec<k8s_openapi::api::core::v1::Node> = serde_json::from_value(
        serde_json::from_str::<Value>(include_str!("k8s/nodes.json")).unwrap()["items"].clone(),
    )
    .unwrap();
    let cpu_only = capacity_from_nodes(&nodes, &["example.com/none".to_string()]);
    assert_eq!(cpu_only.nodes, 3);
    assert_eq!(cpu_only.cpus_per_node, 63);
}

#[test]
fn names_and_quantities() {
    assert_eq!(dns_label("baygrid-HK_Hospital"), "baygrid-hk-hospital");
    assert_eq!(quantity_bytes("1Gi"), Some(1073741824.0));
    assert_eq!(quantity_bytes("500M"), Some(5e8));
    assert_eq!(quantity_bytes("63500m"), Some(63.5));
    assert_eq!(quantity_bytes("12"), Some(12.0));
    assert_eq!(quantity_bytes("x"), None);
}

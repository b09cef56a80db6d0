//! The Kubernetes engine: each baygrid job is a batch/v1 Job in a namespace per tenant.
//!
//! - A gang of N nodes is an Indexed Job with `completions = parallelism = N`, one pod per
//!   node, with a headless Service so that rank 0 is reachable as `BAYGRID_MASTER_ADDR`,
//!   and the gang annotations the cluster's batch scheduler reads (Volcano's
//!   `scheduling.volcano.sh/group-min-member` by default; Kueue's pod-group annotations by
//!   config) so that it starts all pods or none.
//! - Requests and limits carry CPU, memory and the accelerator as an extended resource
//!   (`nvidia.com/gpu`, `huawei.com/Ascend910`, … per model from the config).
//! - Jobs and pods are watched with reflectors; a status read falls back to a direct GET
//!   when the store has not seen the Job (a restarted agent re-attaching).
//! - Each pod's log is followed as a stream into a file in the job's folder, read past the
//!   agent's cursor like the other engines' output files.
//! - A job's staged inputs (read-only) and outputs folder are mounted at the agent's own
//!   paths through the configured `work_volume` (hostPath or NFS); with none configured, a
//!   job that has them is refused rather than run without them.
//! - Cancel deletes the Job with background propagation (its pods and Service go with it).
//! - Capacity comes from the nodes' allocatable resources.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, Event, HostPathVolumeSource, NFSVolumeSource, Namespace, Node,
    ObjectFieldSelector, Pod, PodSpec, PodTemplateSpec, ResourceRequirements, Service, ServicePort,
    ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Client, ResourceExt};

use crate::{
    Engine, EngineCapacity, ExecError, JobHandle, JobStatus, KubernetesConfig, LaunchSpec,
    LogCursor, OutputLine, WorkVolume,
};

/// The label every object baygrid makes carries; the reflector watches it.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
const JOB_ID_LABEL: &str = "baygrid.io/job-id";
const EPOCH_LABEL: &str = "baygrid.io/epoch";
/// Pods of a job that must have no network carry `baygrid.io/network: none`.
pub const NETWORK_LABEL: &str = "baygrid.io/network";
/// The tenant namespace's deny-all policy for those pods.
pub const NO_NETWORK_POLICY: &str = "baygrid-no-network";
const JOB_NAME_LABEL: &str = "batch.kubernetes.io/job-name";
const INDEX_ANNOTATION: &str = "batch.kubernetes.io/job-completion-index";

/// Kubernetes, driven through its API with kube-rs.
pub struct KubernetesEngine {
    client: Client,
    config: KubernetesConfig,
    /// Per-job folders for what the agent keeps beside the API's view (the cancel mark).
    work_dir: PathBuf,
    jobs: reflector::Store<Job>,
    pods: reflector::Store<Pod>,
    watches: Vec<tokio::task::JoinHandle<()>>,
    /// Log streams (`follow`) per pod uid, each copying the pod's log into a file in the
    /// job's folder; `true` once the stream has ended.
    streams: std::sync::Mutex<BTreeMap<String, StreamState>>,
}

struct StreamState {
    task: tokio::task::JoinHandle<()>,
    ended: Arc<AtomicBool>,
    /// Started while the pod ran: once it ends, one more stream after the pod has finished
    /// reads the log to its end.
    started_while_running: bool,
}

impl Drop for KubernetesEngine {
    fn drop(&mut self) {
        for w in &self.watches {
            w.abort();
        }
        if let Ok(streams) = self.streams.lock() {
            for s in streams.values() {
                s.task.abort();
            }
        }
    }
}

/// Run a reflector over baygrid's objects of one kind, across namespaces.
fn reflect<K>(client: &Client) -> (reflector::Store<K>, tokio::task::JoinHandle<()>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let api: Api<K> = Api::all(client.clone());
    let stream = reflector(
        writer,
        watcher(
            api,
            watcher::Config::default().labels(&format!("{MANAGED_BY}=baygrid")),
        ),
    )
    .default_backoff()
    .applied_objects();
    let task = tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                tracing::debug!(error = %e, "kubernetes watch");
            }
        }
    });
    (reader, task)
}

fn k8s_err(context: &str, e: kube::Error) -> ExecError {
    ExecError::Launch(format!("kubernetes {context}: {e}"))
}

/// A DNS-1123 label from free text: lowercase alphanumerics and '-', at most 63 chars.
pub fn dns_label(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    out.truncate(63);
    out.trim_matches('-').to_string()
}

impl KubernetesEngine {
    /// Connect with the configured kubeconfig, or the in-cluster / default one.
    pub async fn connect(config: KubernetesConfig, work_dir: PathBuf) -> Result<Self, ExecError> {
        let client = match &config.kubeconfig {
            Some(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                    ExecError::Launch(format!("kubeconfig {}: {e}", path.display()))
                })?;
                let cfg = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                    .await
                    .map_err(|e| {
                        ExecError::Launch(format!("kubeconfig {}: {e}", path.display()))
                    })?;
                Client::try_from(cfg).map_err(|e| k8s_err("client", e))?
            }
            None => Client::try_default()
                .await
                .map_err(|e| k8s_err("client", e))?,
        };
        Ok(Self::with_client(client, config, work_dir))
    }

    /// Use an existing client (tests pass one over a mock service). Starts the reflector.
    pub fn with_client(client: Client, config: KubernetesConfig, work_dir: PathBuf) -> Self {
        let (jobs, job_watch) = reflect::<Job>(&client);
        let (pods, pod_watch) = reflect::<Pod>(&client);
        KubernetesEngine {
            client,
            config,
            work_dir,
            jobs,
            pods,
            watches: vec![job_watch, pod_watch],
            streams: std::sync::Mutex::new(BTreeMap::new()),
        }
    }

    pub fn namespace(&self, tenant: &str) -> String {
        dns_label(&format!("{}{}", self.config.namespace_prefix, tenant))
    }

    pub fn job_name(spec: &LaunchSpec) -> String {
        dns_label(&format!("bg-{}-{}", spec.job_id, spec.epoch))
    }

    fn resource_for(&self, model: &str) -> String {
        self.config
            .resources
            .get(model)
            .cloned()
            .unwrap_or_else(|| self.config.default_resource.clone())
    }

    /// The volumes and mounts that show a job the agent's folders at the agent's paths.
    fn folders(&self, spec: &LaunchSpec) -> Result<(Vec<Volume>, Vec<VolumeMount>), ExecError> {
        if spec.folders.is_empty() {
            return Ok((vec![], vec![]));
        }
        let Some(volume) = &self.config.work_volume else {
            return Err(ExecError::Refused(format!(
                "the job reads or writes folders on the agent ({}), which its pods cannot see: \
                 set `kubernetes.work_volume` (host_path or nfs) in the agent's config",
                spec.folders
                    .iter()
                    .map(|f| f.path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        let mut volumes = Vec::new();
        let mut mounts = Vec::new();
        for (i, folder) in spec.folders.iter().enumerate() {
            if !folder.path.is_absolute() {
                return Err(ExecError::Refused(format!(
                    "folder {} is not an absolute path",
                    folder.path.display()
                )));
            }
            let path = folder.path.display().to_string();
            match volume {
                WorkVolume::HostPath => {
                    let name = format!("baygrid-folder-{i}");
                    volumes.push(Volume {
                        name: name.clone(),
                        host_path: Some(HostPathVolumeSource {
                            path: path.clone(),
                            type_: Some("Directory".into()),
                        }),
                        ..Default::default()
                    });
                    mounts.push(VolumeMount {
                        name,
                        mount_path: path,
                        read_only: Some(!folder.writable),
                        ..Default::default()
                    });
                }
                WorkVolume::Nfs {
                    server,
                    path: export,
                    mounted_at,
                } => {
                    let Ok(within) = folder.path.strip_prefix(mounted_at) else {
                        return Err(ExecError::Refused(format!(
                            "folder {path} is outside the NFS mount at {}, which the pods see",
                            mounted_at.display()
                        )));
                    };
                    if volumes.is_empty() {
                        volumes.push(Volume {
                            name: "baygrid-work".into(),
                            nfs: Some(NFSVolumeSource {
                                server: server.clone(),
                                path: export.clone(),
                                read_only: None,
                            }),
                            ..Default::default()
                        });
                    }
                    mounts.push(VolumeMount {
                        name: "baygrid-work".into(),
                        mount_path: path,
                        sub_path: Some(within.display().to_string()),
                        read_only: Some(!folder.writable),
                        ..Default::default()
                    });
                }
            }
        }
        Ok((volumes, mounts))
    }

    /// The Job for a launch, as it is sent to the API server; refused when the job needs
    /// folders its pods could not see.
    pub fn job_object(&self, spec: &LaunchSpec) -> Result<Job, ExecError> {
        let (volumes, mounts) = self.folders(spec)?;
        let name = Self::job_name(spec);
        let namespace = self.namespace(&spec.tenant);
        let nodes = spec.nodes.max(1) as i32;
        let fill = |v: &str| {
            v.replace("{name}", &name)
                .replace("{nodes}", &nodes.to_string())
        };
        let annotations: BTreeMap<String, String> = self
            .config
            .gang_annotations
            .iter()
            .map(|(k, v)| (k.clone(), fill(v)))
            .collect();
        let mut labels = self.config.labels.clone();
        labels.insert(MANAGED_BY.into(), "baygrid".into());
        labels.insert(JOB_ID_LABEL.into(), dns_label(&spec.job_id));
        labels.insert(EPOCH_LABEL.into(), spec.epoch.to_string());
        if spec.no_network {
            labels.insert(NETWORK_LABEL.into(), "none".into());
        }

        let mut quantities = BTreeMap::from([
            (
                "cpu".to_string(),
                Quantity(spec.cpus_per_node.max(1).to_string()),
            ),
            (
                "memory".to_string(),
                Quantity(format!("{}Gi", spec.memory_gb_per_node.max(1))),
            ),
        ]);
        if let (Some(model), n) = (&spec.accelerator, spec.accelerators_per_node) {
            if n > 0 {
                quantities.insert(self.resource_for(model), Quantity(n.to_string()));
            }
        }
        let mut env: Vec<EnvVar> = spec
            .env
            .iter()
            .map(|(k, v)| EnvVar {
                name: k.clone(),
                value: Some(v.clone()),
                ..Default::default()
            })
            .collect();
        let plain = |k: &str, v: String| EnvVar {
            name: k.into(),
            value: Some(v),
            ..Default::default()
        };
        env.push(plain("BAYGRID_JOB_ID", spec.job_id.clone()));
        env.push(plain("BAYGRID_WORLD_SIZE", nodes.to_string()));
        env.push(plain("BAYGRID_MASTER_ADDR", format!("{name}-0.{name}")));
        env.push(EnvVar {
            name: "BAYGRID_RANK".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: format!("metadata.annotations['{INDEX_ANNOTATION}']"),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });

        let deadline = spec
            .time_limit
            .map(|t| (t.as_secs_f64() * self.config.time_margin).ceil() as i64)
            .into_iter()
            .chain(spec.held.map(|h| h.as_secs() as i64))
            .min()
            .map(|s| s.max(1));

        Ok(Job {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace),
                labels: Some(labels.clone()),
                annotations: Some(annotations.clone()),
                ..Default::default()
            },
            spec: Some(JobSpec {
                completion_mode: Some("Indexed".into()),
                completions: Some(nodes),
                parallelism: Some(nodes),
                backoff_limit: Some(0),
                active_deadline_seconds: deadline,
                ttl_seconds_after_finished: Some(self.config.ttl_after_finished),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels),
                        annotations: Some(annotations),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        restart_policy: Some("Never".into()),
                        subdomain: Some(name.clone()),
                        scheduler_name: (!self.config.scheduler_name.is_empty())
                            .then(|| self.config.scheduler_name.clone()),
                        containers: vec![Container {
                            name: "main".into(),
                            image: Some(
                                spec.image
                                    .clone()
                                    .unwrap_or_else(|| self.config.default_image.clone()),
                            ),
                            command: Some(vec!["sh".into(), "-c".into(), spec.command.clone()]),
                            env: Some(env),
                            resources: Some(ResourceRequirements {
                                requests: Some(quantities.clone()),
                                limits: Some(quantities),
                                ..Default::default()
                            }),
                            volume_mounts: (!mounts.is_empty()).then_some(mounts),
                            ..Default::default()
                        }],
                        volumes: (!volumes.is_empty()).then_some(volumes),
                        ..Default::default()
                    }),
                },
                ..Default::default()
            }),
            status: None,
        })
    }

    async fn ensure_namespace(&self, namespace: &str) -> Result<(), ExecError> {
        if !self.config.create_namespaces {
            return Ok(());
        }
        let api: Api<Namespace> = Api::all(self.client.clone());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(namespace.to_string()),
                labels: Some(BTreeMap::from([(MANAGED_BY.into(), "baygrid".into())])),
                ..Default::default()
            },
            ..Default::default()
        };
        match api.create(&PostParams::default(), &ns).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(k8s_err(&format!("namespace {namespace}"), e)),
        }
    }

    /// The tenant namespace's deny-all NetworkPolicy for pods labelled
    /// `baygrid.io/network: none` (no ingress, no egress). It takes effect where the
    /// cluster's network plugin enforces NetworkPolicies.
    async fn ensure_no_network_policy(&self, namespace: &str) -> Result<(), ExecError> {
        use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicySpec};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
        let api: Api<NetworkPolicy> = Api::namespaced(self.client.clone(), namespace);
        let policy = NetworkPolicy {
            metadata: ObjectMeta {
                name: Some(NO_NETWORK_POLICY.into()),
                labels: Some(BTreeMap::from([(MANAGED_BY.into(), "baygrid".into())])),
                ..Default::default()
            },
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(LabelSelector {
                    match_labels: Some(BTreeMap::from([(NETWORK_LABEL.into(), "none".into())])),
                    ..Default::default()
                }),
                policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
                ingress: None,
                egress: None,
            }),
        };
        match api.create(&PostParams::default(), &policy).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(k8s_err(
                &format!("network policy in {namespace} (the job must have no network)"),
                e,
            )),
        }
    }

    fn handle_parts(handle: &JobHandle) -> Result<(String, String), ExecError> {
        let get = |k: &str| {
            handle
                .detail
                .get(k)
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .ok_or_else(|| ExecError::ForeignHandle(format!("no `{k}` in a kubernetes handle")))
        };
        if handle.engine != "kubernetes" {
            return Err(ExecError::ForeignHandle(handle.engine.clone()));
        }
        Ok((get("namespace")?, get("name")?))
    }

    async fn pods(&self, namespace: &str, name: &str) -> Result<Vec<Pod>, ExecError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let mut pods = api
            .list(&ListParams::default().labels(&format!("{JOB_NAME_LABEL}={name}")))
            .await
            .map_err(|e| k8s_err("list pods", e))?
            .items;
        pods.sort_by_key(pod_index);
        Ok(pods)
    }

    /// The job's pods from the pod reflector; a direct list when it has none yet.
    async fn watched_pods(&self, namespace: &str, name: &str) -> Result<Vec<Pod>, ExecError> {
        let mut pods: Vec<Pod> = self
            .pods
            .state()
            .iter()
            .filter(|p| p.namespace().as_deref() == Some(namespace))
            .filter(|p| p.labels().get(JOB_NAME_LABEL).map(String::as_str) == Some(name))
            .map(|p| (**p).clone())
            .collect();
        if pods.is_empty() {
            return self.pods(namespace, name).await;
        }
        pods.sort_by_key(pod_index);
        Ok(pods)
    }

    /// Start following a pod's log into `file` (rewritten from the start, so a restarted
    /// agent's cursor stays valid) unless a stream for it is already running.
    /// A stream that ended while the pod still runs (the API server closed it), or that
    /// started before the pod finished, is started again. Returns whether the pod's log has
    /// been read to its end.
    fn follow(&self, namespace: &str, pod: &str, uid: &str, file: PathBuf, running: bool) -> bool {
        let mut streams = self.streams.lock().expect("stream table lock");
        if let Some(s) = streams.get(uid) {
            let ended = s.ended.load(Ordering::SeqCst);
            if !ended {
                return false;
            }
            if !running && !s.started_while_running {
                return true;
            }
        }
        let ended = Arc::new(AtomicBool::new(false));
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let (pod, done) = (pod.to_string(), ended.clone());
        let task = tokio::spawn(async move {
            let params = LogParams {
                follow: true,
                ..Default::default()
            };
            let result = async {
                if let Some(dir) = file.parent() {
                    tokio::fs::create_dir_all(dir).await?;
                }
                let mut out = tokio::fs::File::create(&file).await?;
                let stream = api
                    .log_stream(&pod, &params)
                    .await
                    .map_err(std::io::Error::other)?;
                futures::pin_mut!(stream);
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = futures::AsyncReadExt::read(&mut stream, &mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    tokio::io::AsyncWriteExt::write_all(&mut out, &buf[..n]).await?;
                    tokio::io::AsyncWriteExt::flush(&mut out).await?;
                }
                Ok::<_, std::io::Error>(())
            }
            .await;
            if let Err(e) = result {
                tracing::debug!(error = %e, pod, "kubernetes log stream");
            }
            done.store(true, Ordering::SeqCst);
        });
        streams.insert(
            uid.to_string(),
            StreamState {
                task,
                ended,
                started_while_running: running,
            },
        );
        false
    }

    /// The Job controller's last FailedCreate warning (a quota or policy refusing the
    /// pods), in Kubernetes' words.
    async fn creation_failure(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<String>, ExecError> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), namespace);
        let events = api
            .list(&ListParams::default().fields(&format!(
                "involvedObject.kind=Job,involvedObject.name={name}"
            )))
            .await
            .map_err(|e| k8s_err("list events", e))?
            .items;
        Ok(events
            .iter()
            .rfind(|e| {
                let m = e.message.as_deref().unwrap_or("");
                e.reason.as_deref() == Some("FailedCreate")
                    && (m.contains("forbidden") || m.contains("exceeded quota"))
            })
            .map(|e| {
                format!(
                    "kubernetes FailedCreate: {}",
                    e.message.as_deref().unwrap_or("")
                )
            }))
    }

    async fn job(&self, namespace: &str, name: &str) -> Result<Option<Job>, ExecError> {
        let key = reflector::ObjectRef::<Job>::new(name).within(namespace);
        if let Some(job) = self.jobs.get(&key) {
            return Ok(Some((*job).clone()));
        }
        let api: Api<Job> = Api::namespaced(self.client.clone(), namespace);
        api.get_opt(name).await.map_err(|e| k8s_err("get job", e))
    }
}

fn pod_index(pod: &Pod) -> u32 {
    pod.annotations()
        .get(INDEX_ANNOTATION)
        .and_then(|v| v.parse().ok())
        .unwrap_or(u32::MAX)
}

/// A pod's failed container: (when it finished, exit code, reason); an evicted pod has no
/// exit code.
fn pod_failure(pod: &Pod) -> Option<(String, Option<i64>, String)> {
    let status = pod.status.as_ref()?;
    if status.reason.as_deref() == Some("Evicted") {
        return Some((String::new(), None, "Evicted".into()));
    }
    status
        .container_statuses
        .iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref())
        .find(|t| t.exit_code != 0)
        .map(|t| {
            (
                t.finished_at
                    .as_ref()
                    .map(|f| format!("{:?}", f.0))
                    .unwrap_or_default(),
                Some(t.exit_code as i64),
                t.reason.clone().unwrap_or_else(|| "Error".into()),
            )
        })
}

/// The failure that came first: the job controller kills a gang's other pods after one
/// fails, so later exit codes (137, 143) are consequences.
fn first_failure(pods: &[Pod]) -> Option<(Option<i64>, String)> {
    pods.iter()
        .filter_map(pod_failure)
        .min_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, code, why)| (code, why))
}

/// Container states Kubernetes retries forever but that will not succeed on their own.
const STUCK: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// Why a pod cannot start, in Kubernetes' words, when it is stuck.
fn pod_stuck(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .container_statuses
        .iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
        .find(|w| STUCK.contains(&w.reason.as_deref().unwrap_or("")))
        .map(|w| {
            format!(
                "kubernetes {}: {}",
                w.reason.as_deref().unwrap_or(""),
                w.message.as_deref().unwrap_or("")
            )
        })
}

fn pod_disrupted(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "DisruptionTarget" && c.status == "True")
        .map(|c| {
            c.reason
                .clone()
                .unwrap_or_else(|| "DisruptionTarget".into())
        })
}

/// What a Job's conditions mean for baygrid; `pods` explain a failure.
pub fn job_status(job: &Job, pods: &[Pod], cancel_requested: bool) -> JobStatus {
    let conditions = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let active = |t: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == t && c.status == "True")
    };
    if active("Complete").is_some() {
        return JobStatus::Succeeded;
    }
    if let Some(failed) = active("Failed") {
        let reason = failed.reason.clone().unwrap_or_default();
        let message = failed.message.clone().unwrap_or_default();
        if let Some(disruption) = pods.iter().find_map(pod_disrupted) {
            return JobStatus::Lost {
                reason: format!(
                    "kubernetes: pod disrupted ({disruption}): lost on the provider's side"
                ),
            };
        }
        if reason == "DeadlineExceeded" {
            return JobStatus::Failed {
                exit_code: None,
                reason: format!(
                    "kubernetes DeadlineExceeded: the job ran past its time limit ({message})"
                ),
            };
        }
        let failure = first_failure(pods);
        if let Some((None, why)) = &failure {
            return JobStatus::Lost {
                reason: format!("kubernetes: pod {why}: lost on the provider's side"),
            };
        }
        let (exit_code, why) = failure.unwrap_or((None, String::new()));
        return JobStatus::Failed {
            exit_code,
            reason: format!(
                "kubernetes Job failed: {reason}{}{}",
                exit_code
                    .map(|c| format!(", exit code {c}"))
                    .unwrap_or_default(),
                if why.is_empty() {
                    String::new()
                } else {
                    format!(" ({why})")
                }
            ),
        };
    }
    if cancel_requested && job.metadata.deletion_timestamp.is_some() {
        return JobStatus::Cancelled {
            reason: "kubernetes Job deleted".into(),
        };
    }
    JobStatus::Running
}

/// Bytes of a quantity such as `128Gi`, `500M`, `1048576Ki` or `1e9`.
pub fn quantity_bytes(q: &str) -> Option<f64> {
    let q = q.trim();
    let units: [(&str, f64); 12] = [
        ("Ki", 1024.0),
        ("Mi", 1024f64.powi(2)),
        ("Gi", 1024f64.powi(3)),
        ("Ti", 1024f64.powi(4)),
        ("Pi", 1024f64.powi(5)),
        ("Ei", 1024f64.powi(6)),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    for (suffix, factor) in units {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<f64>().ok().map(|v| v * factor);
        }
    }
    if let Some(n) = q.strip_suffix('m') {
        return n.parse::<f64>().ok().map(|v| v / 1000.0);
    }
    q.parse::<f64>().ok()
}

/// Capacity from nodes: ready, schedulable nodes; when any has the configured accelerator
/// resources, only those count. Per-node figures are the smallest among counted nodes.
pub fn capacity_from_nodes(nodes: &[Node], accelerator_resources: &[String]) -> EngineCapacity {
    let usable: Vec<&Node> = nodes
        .iter()
        .filter(|n| {
            !n.spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false)
        })
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .collect();
    let accel = |n: &Node| -> u32 {
        let alloc = n.status.as_ref().and_then(|s| s.allocatable.as_ref());
        accelerator_resources
            .iter()
            .filter_map(|r| alloc?.get(r))
            .filter_map(|q| quantity_bytes(&q.0))
            .map(|v| v as u32)
            .max()
            .unwrap_or(0)
    };
    let with_accel: Vec<&Node> = usable.iter().copied().filter(|n| accel(n) > 0).collect();
    let counted = if with_accel.is_empty() {
        usable
    } else {
        with_accel
    };
    if counted.is_empty() {
        return EngineCapacity::default();
    }
    let get = |n: &Node, r: &str| {
        n.status
            .as_ref()
            .and_then(|s| s.allocatable.as_ref())
            .and_then(|a| a.get(r))
            .and_then(|q| quantity_bytes(&q.0))
            .unwrap_or(0.0)
    };
    EngineCapacity {
        nodes: counted.len() as u32,
        accelerators_per_node: counted.iter().map(|n| accel(n)).min().unwrap_or(0),
        cpus_per_node: counted
            .iter()
            .map(|n| get(n, "cpu").floor() as u32)
            .min()
            .unwrap_or(0),
        memory_gb_per_node: counted
            .iter()
            .map(|n| (get(n, "memory") / 1024f64.powi(3)).floor() as u32)
            .min()
            .unwrap_or(0),
    }
}

#[async_trait::async_trait]
impl Engine for KubernetesEngine {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<JobHandle, ExecError> {
        let job = self.job_object(spec)?;
        let name = job.name_any();
        let dir = self.work_dir.join(&name);
        std::fs::create_dir_all(&dir)?;
        let namespace = job.namespace().unwrap_or_default();
        self.ensure_namespace(&namespace).await?;
        if spec.no_network {
            // before the Job, so its pods never start without the policy in place
            self.ensure_no_network_policy(&namespace).await?;
        }
        let api: Api<Job> = Api::namespaced(self.client.clone(), &namespace);
        let created = match api.create(&PostParams::default(), &job).await {
            Ok(j) => j,
            // Already made by this agent before a restart: adopt it.
            Err(kube::Error::Api(e)) if e.code == 409 => api
                .get(&name)
                .await
                .map_err(|e| k8s_err("get existing job", e))?,
            Err(kube::Error::Api(e)) if e.code == 403 || e.code == 422 => {
                return Err(ExecError::Refused(format!(
                    "kubernetes {}: {}",
                    e.reason, e.message
                )))
            }
            Err(e) => return Err(k8s_err("create job", e)),
        };
        if spec.nodes > 1 {
            let service = Service {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(namespace.clone()),
                    labels: Some(BTreeMap::from([(MANAGED_BY.into(), "baygrid".into())])),
                    owner_references: created.uid().map(|uid| {
                        vec![OwnerReference {
                            api_version: "batch/v1".into(),
                            kind: "Job".into(),
                            name: name.clone(),
                            uid,
                            ..Default::default()
                        }]
                    }),
                    ..Default::default()
                },
                spec: Some(ServiceSpec {
                    cluster_ip: Some("None".into()),
                    selector: Some(BTreeMap::from([(JOB_NAME_LABEL.into(), name.clone())])),
                    ports: Some(vec![ServicePort {
                        name: Some("rendezvous".into()),
                        port: 29500,
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let services: Api<Service> = Api::namespaced(self.client.clone(), &namespace);
            match services.create(&PostParams::default(), &service).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(k8s_err("create gang service", e)),
            }
        }
        Ok(JobHandle {
            job_id: spec.job_id.clone(),
            epoch: spec.epoch,
            engine: "kubernetes".into(),
            dir,
            detail: serde_json::json!({
                "namespace": namespace,
                "name": name,
                "uid": created.uid(),
                "nodes": spec.nodes,
            }),
        })
    }

    async fn status(&self, handle: &JobHandle) -> Result<JobStatus, ExecError> {
        let (namespace, name) = Self::handle_parts(handle)?;
        let cancel_requested = handle.dir.join("cancelled").exists();
        match self.job(&namespace, &name).await? {
            None if cancel_requested => Ok(JobStatus::Cancelled {
                reason: "kubernetes Job deleted".into(),
            }),
            None => Ok(JobStatus::Lost {
                reason: format!("kubernetes Job {namespace}/{name} is gone"),
            }),
            Some(job) => {
                let failed = job
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Failed" && c.status == "True"));
                let pods = if failed {
                    self.pods(&namespace, &name).await?
                } else {
                    self.watched_pods(&namespace, &name).await?
                };
                let status = job_status(&job, &pods, cancel_requested);
                if status != JobStatus::Running {
                    return Ok(status);
                }
                // Kubernetes keeps retrying what cannot succeed (an image that cannot be
                // pulled, pods a quota forbids): fail the job with Kubernetes' own words and
                // delete it so that it holds nothing.
                let stuck = match pods.iter().find_map(pod_stuck) {
                    Some(why) => Some(why),
                    None if pods.is_empty() => self.creation_failure(&namespace, &name).await?,
                    None => None,
                };
                match stuck {
                    Some(reason) => {
                        let api: Api<Job> = Api::namespaced(self.client.clone(), &namespace);
                        if let Err(e) = api.delete(&name, &DeleteParams::background()).await {
                            tracing::warn!(error = %e, job = name, "cannot delete a stuck job");
                        }
                        Ok(JobStatus::Failed {
                            exit_code: None,
                            reason,
                        })
                    }
                    None => Ok(JobStatus::Running),
                }
            }
        }
    }

    async fn read_output(
        &self,
        handle: &JobHandle,
        cursor: &mut LogCursor,
    ) -> Result<Vec<OutputLine>, ExecError> {
        let (namespace, name) = Self::handle_parts(handle)?;
        let mut out = Vec::new();
        for pod in self.watched_pods(&namespace, &name).await? {
            let phase = pod
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default();
            if phase == "Pending" || phase.is_empty() {
                continue;
            }
            let index = pod_index(&pod);
            let stream = if index == 0 || index == u32::MAX {
                "stdout".to_string()
            } else {
                format!("stdout.{index}")
            };
            let file = handle.dir.join(format!("{stream}.log"));
            let uid = pod.uid().unwrap_or_else(|| pod.name_any());
            let stream_ended = self.follow(
                &namespace,
                &pod.name_any(),
                &uid,
                file.clone(),
                phase == "Running",
            );
            let ended = (phase == "Succeeded" || phase == "Failed") && stream_ended;
            for line in cursor.read_new_lines(&file, &stream, ended) {
                out.push(OutputLine {
                    stream: stream.clone(),
                    line,
                });
            }
        }
        Ok(out)
    }

    async fn cancel(&self, handle: &JobHandle) -> Result<(), ExecError> {
        let (namespace, name) = Self::handle_parts(handle)?;
        if !handle.dir.as_os_str().is_empty() {
            std::fs::create_dir_all(&handle.dir)?;
            std::fs::write(handle.dir.join("cancelled"), b"")?;
        }
        let api: Api<Job> = Api::namespaced(self.client.clone(), &namespace);
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(k8s_err("delete job", e)),
        }
    }

    fn enforces_time_limit(&self) -> bool {
        true
    }

    async fn capacity(&self) -> Result<Option<EngineCapacity>, ExecError> {
        let api: Api<Node> = Api::all(self.client.clone());
        let nodes = api
            .list(&ListParams::default())
            .await
            .map_err(|e| k8s_err("list nodes", e))?
            .items;
        let mut resources: Vec<String> = self.config.resources.values().cloned().collect();
        resources.push(self.config.default_resource.clone());
        resources.dedup();
        Ok(Some(capacity_from_nodes(&nodes, &resources)))
    }
}

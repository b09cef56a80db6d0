//! Settings of the Kubernetes engine; always compiled, so that agent configs parse the
//! same with and without the `k8s` feature.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How the agent drives its Kubernetes cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// A kubeconfig file; the in-cluster or default configuration when empty.
    pub kubeconfig: Option<PathBuf>,
    /// A tenant's jobs go to the namespace `<prefix><tenant>`.
    pub namespace_prefix: String,
    /// Create the tenant's namespace when it does not exist (needs the RBAC in
    /// deploy/kubernetes/rbac.yaml).
    pub create_namespaces: bool,
    /// The image for jobs whose spec names none.
    pub default_image: String,
    /// Accelerator model → extended resource name.
    pub resources: BTreeMap<String, String>,
    /// The extended resource for models not in `resources`.
    pub default_resource: String,
    /// Annotations put on the Job and its pods, with `{name}` and `{nodes}` filled in:
    /// the gang's minimum for the cluster's batch scheduler.
    pub gang_annotations: BTreeMap<String, String>,
    /// Extra labels on the Job, e.g. `kueue.x-k8s.io/queue-name`.
    pub labels: BTreeMap<String, String>,
    /// activeDeadlineSeconds = estimated duration × this margin (never past the hold).
    pub time_margin: f64,
    /// Seconds a finished Job is kept (for its logs) before Kubernetes deletes it.
    pub ttl_after_finished: i32,
    /// The pods' scheduler, e.g. `volcano`; the cluster default when empty.
    pub scheduler_name: String,
    /// How pods see the agent's folders (a job's staged inputs and its outputs) at the
    /// agent's own paths. Without it, a job with inputs or outputs is refused.
    pub work_volume: Option<WorkVolume>,
}

/// How the agent's work folder reaches the pods, mounted at the same path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum WorkVolume {
    /// The nodes see the agent's folders at the same paths: the agent on the cluster's
    /// only node, or a shared filesystem mounted at the same place on the agent and on
    /// every node. Each folder is a `hostPath` volume.
    HostPath,
    /// An NFS export that the agent has mounted at `mounted_at`: pods mount the export and
    /// see each folder at its path under `mounted_at`.
    Nfs {
        server: String,
        path: String,
        mounted_at: PathBuf,
    },
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            kubeconfig: None,
            namespace_prefix: "baygrid-".into(),
            create_namespaces: true,
            default_image: "busybox:1.36".into(),
            resources: BTreeMap::from([
                ("Ascend910B".to_string(), "huawei.com/Ascend910".to_string()),
                ("Ascend910C".to_string(), "huawei.com/Ascend910".to_string()),
                ("910B".to_string(), "huawei.com/Ascend910".to_string()),
                ("910C".to_string(), "huawei.com/Ascend910".to_string()),
            ]),
            default_resource: "nvidia.com/gpu".into(),
            gang_annotations: BTreeMap::from([(
                "scheduling.volcano.sh/group-min-member".to_string(),
                "{nodes}".to_string(),
            )]),
            labels: BTreeMap::new(),
            time_margin: 1.5,
            ttl_after_finished: 3600,
            scheduler_name: String::new(),
            work_volume: None,
        }
    }
}

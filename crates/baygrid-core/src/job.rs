//! Jobs: the spec a tenant submits (YAML or JSON), its validation, and its lifecycle.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::catalog::Jurisdiction;
use crate::ids::is_valid_name;
use crate::money::Money;

/// The largest gang a spec may ask for.
pub const MAX_NODES: u32 = 4096;
/// The most datasets one job may read.
pub const MAX_INPUTS: usize = 16;

/// A bad spec: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[error("{field}: {problem}")]
pub struct SpecError {
    pub field: String,
    pub problem: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        SpecError {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// From a parser's error at `path`; `whole` names the document when the path is empty.
    pub fn at(path: &serde_path_to_error::Path, message: &str, whole: &str) -> Self {
        let field = path.to_string();
        let problem = parser_problem(message, &field);
        let field = if field == "." || field == "?" {
            whole.to_string()
        } else {
            field
        };
        SpecError::new(field, problem)
    }
}

/// What a tenant submits, in the style of SkyPilot and Kubernetes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: String,
    pub resources: Resources,
    /// A shell command, run with `sh -c` on each node.
    pub command: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// A container image; engines without a container runtime refuse it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// How long the job runs on the reference accelerator, e.g. `90s`, `10m`, `2h`.
    #[schema(value_type = String, example = "10m")]
    pub estimated_duration: HumanDuration,
    /// The most the tenant pays per accelerator-hour, e.g. `25.00 CNY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_price_per_hour: Option<Money>,
    /// RFC 3339 instant by which the job must finish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<chrono::DateTime<chrono::Utc>>,
    /// Higher runs first; -1000 to 1000.
    #[serde(default)]
    pub priority: i32,
    /// A priority class named in the server's config (`priority_classes`), which sets
    /// `priority`; give one or the other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class: Option<String>,
    /// Runs only at sites within 5 ms round trip of the tenant's city.
    #[serde(default)]
    pub latency_sensitive: bool,
    /// The dispatcher may stop it (after it has run the server's `preemption_grace`) for a
    /// higher-priority job, or to give another tenant its fair share, and queue it again;
    /// the stopped run is not charged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preemptible: bool,
    /// Jurisdictions the job may run in; all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_jurisdictions: Option<Vec<Jurisdiction>>,
    /// Dataset names the job reads. The job runs only where every input may be copied
    /// under the cross-border rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<String>,
    /// What the job uses its inputs for (the flow's purpose); required with `inputs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// Sites the job may run at (like a region); all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sites: Option<Vec<String>>,
    /// Set by the exchange on the jobs of a fusion run's workers, never in a submitted
    /// spec: the site's agent runs the worker itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fusion: Option<FusionPart>,
}

/// Which fusion run, and which of its workers, a job is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FusionPart {
    pub run: String,
    /// 0 for the aggregator or dealer, the party's number otherwise.
    pub index: usize,
}

/// What each node of the gang needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Accelerators per node: `{H800: 8}`, or acceptable alternatives
    /// `[{H800: 8}, {Ascend910B: 8}]`. Absent for CPU-only work.
    #[serde(default, skip_serializing_if = "AcceleratorRequest::is_none")]
    #[schema(value_type = Object)]
    pub accelerators: AcceleratorRequest,
    /// Nodes in the gang, placed all together in one cluster.
    #[serde(default = "one")]
    pub nodes: u32,
    /// CPUs per node.
    #[serde(default = "one")]
    pub cpus: u32,
    /// Memory per node, in GB.
    #[serde(default = "one")]
    pub memory_gb: u32,
}

fn one() -> u32 {
    1
}

/// Acceptable accelerator choices for each node, in the order the tenant gave them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AcceleratorRequest {
    pub alternatives: Vec<(String, u32)>,
}

impl AcceleratorRequest {
    pub fn is_none(&self) -> bool {
        self.alternatives.is_empty()
    }
}

impl Serialize for AcceleratorRequest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        if self.alternatives.len() == 1 {
            let mut map = BTreeMap::new();
            map.insert(&self.alternatives[0].0, self.alternatives[0].1);
            return map.serialize(serializer);
        }
        let mut seq = serializer.serialize_seq(Some(self.alternatives.len()))?;
        for (model, count) in &self.alternatives {
            let mut map = BTreeMap::new();
            map.insert(model, *count);
            seq.serialize_element(&map)?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for AcceleratorRequest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Shape {
            One(BTreeMap<String, u32>),
            Alternatives(Vec<BTreeMap<String, u32>>),
        }
        let shape = Shape::deserialize(deserializer).map_err(|_| {
            serde::de::Error::custom(
                "expected a map of model to count per node, such as {H800: 8}, \
                 or a list of such maps for alternatives",
            )
        })?;
        let maps =
            match shape {
                Shape::One(map) if map.len() > 1 => return Err(serde::de::Error::custom(
                    "name one model per alternative: write a list such as [{H800: 8}, {A800: 8}]",
                )),
                Shape::One(map) => vec![map],
                Shape::Alternatives(maps) => maps,
            };
        let mut alternatives = Vec::new();
        for map in maps {
            if map.len() != 1 {
                return Err(serde::de::Error::custom(
                    "each alternative names exactly one model, such as {H800: 8}",
                ));
            }
            alternatives.extend(map);
        }
        Ok(AcceleratorRequest { alternatives })
    }
}

/// A duration written as `90s`, `10m`, `1h 30m`, or a number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Shape {
            Seconds(u64),
            Text(String),
        }
        match Shape::deserialize(deserializer) {
            Ok(Shape::Seconds(s)) => Ok(HumanDuration(Duration::from_secs(s))),
            Ok(Shape::Text(t)) => humantime::parse_duration(&t)
                .map(HumanDuration)
                .map_err(|e| {
                    serde::de::Error::custom(format!(
                        "`{t}` is not a duration ({e}): write 90s, 10m or 2h"
                    ))
                }),
            Err(_) => Err(serde::de::Error::custom(
                "expected a duration such as 90s, 10m or 2h, or a number of seconds",
            )),
        }
    }
}

impl JobSpec {
    /// Parses a YAML (or JSON, which is YAML) spec, naming the field at fault.
    pub fn from_yaml(text: &str) -> Result<JobSpec, SpecError> {
        let deserializer = serde_yaml::Deserializer::from_str(text);
        let spec: JobSpec = serde_path_to_error::deserialize(deserializer)
            .map_err(|e| SpecError::at(e.path(), &e.inner().to_string(), "spec"))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Parses a JSON spec, naming the field at fault.
    pub fn from_json(bytes: &[u8]) -> Result<JobSpec, SpecError> {
        let mut deserializer = serde_json::Deserializer::from_slice(bytes);
        let spec: JobSpec = serde_path_to_error::deserialize(&mut deserializer)
            .map_err(|e| SpecError::at(e.path(), &e.inner().to_string(), "body"))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks what can be checked without the catalog.
    pub fn validate(&self) -> Result<(), SpecError> {
        if !is_valid_name(&self.name) {
            return Err(SpecError::new(
                "name",
                format!(
                    "`{}` is not a name: use 1-63 lowercase letters, digits and `-`",
                    self.name
                ),
            ));
        }
        if self.command.trim().is_empty() {
            return Err(SpecError::new("command", "must not be empty"));
        }
        let r = &self.resources;
        if r.nodes == 0 || r.nodes > MAX_NODES {
            return Err(SpecError::new(
                "resources.nodes",
                format!("must be between 1 and {MAX_NODES}, got {}", r.nodes),
            ));
        }
        if r.cpus == 0 {
            return Err(SpecError::new("resources.cpus", "must be at least 1"));
        }
        if r.memory_gb == 0 {
            return Err(SpecError::new("resources.memory_gb", "must be at least 1"));
        }
        for (model, count) in &r.accelerators.alternatives {
            if *count == 0 {
                return Err(SpecError::new(
                    "resources.accelerators",
                    format!("count for `{model}` must be at least 1"),
                ));
            }
        }
        if self.estimated_duration.0.is_zero() {
            return Err(SpecError::new(
                "estimated_duration",
                "must be longer than zero",
            ));
        }
        if self.estimated_duration.0 > Duration::from_secs(366 * 24 * 3600) {
            return Err(SpecError::new(
                "estimated_duration",
                "must be at most a year",
            ));
        }
        if let Some(price) = self.max_price_per_hour {
            if price.minor <= 0 {
                return Err(SpecError::new("max_price_per_hour", "must be positive"));
            }
        }
        for (i, input) in self.inputs.iter().enumerate() {
            if !is_valid_name(input) {
                return Err(SpecError::new(
                    format!("inputs[{i}]"),
                    format!("`{input}` is not a dataset name"),
                ));
            }
            if self.inputs[..i].contains(input) {
                return Err(SpecError::new(
                    format!("inputs[{i}]"),
                    format!("`{input}` is listed twice"),
                ));
            }
        }
        if self.inputs.len() > MAX_INPUTS {
            return Err(SpecError::new(
                "inputs",
                format!("at most {MAX_INPUTS} datasets, got {}", self.inputs.len()),
            ));
        }
        match self.purpose.as_deref() {
            None if !self.inputs.is_empty() => {
                return Err(SpecError::new(
                    "purpose",
                    "a job with inputs must say what it uses them for",
                ));
            }
            Some(purpose)
                if purpose.is_empty()
                    || purpose.len() > 63
                    || !purpose
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
            {
                return Err(SpecError::new(
                    "purpose",
                    format!("`{purpose}` is not a purpose: use letters, digits, `_` and `-`"),
                ));
            }
            _ => {}
        }
        if !(-1000..=1000).contains(&self.priority) {
            return Err(SpecError::new("priority", "must be between -1000 and 1000"));
        }

        for key in self.env.keys() {
            let valid = !key.is_empty()
                && !key.starts_with(|c: char| c.is_ascii_digit())
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(SpecError::new(
                    format!("env.{key}"),
                    "is not a variable name: use letters, digits and `_`",
                ));
            }
            if key.starts_with("BAYGRID_") {
                return Err(SpecError::new(
                    format!("env.{key}"),
                    "the BAYGRID_ prefix is reserved for variables the engine sets",
                ));
            }
        }
        if let Some(allowed) = &self.allowed_jurisdictions {
            if allowed.is_empty() {
                return Err(SpecError::new(
                    "allowed_jurisdictions",
                    "must name at least one jurisdiction when present",
                ));
            }
        }
        if let Some(sites) = &self.sites {
            if sites.is_empty() || sites.len() > 64 {
                return Err(SpecError::new(
                    "sites",
                    format!("must name 1 to 64 sites when present, got {}", sites.len()),
                ));
            }
            for (i, site) in sites.iter().enumerate() {
                if !is_valid_name(site) {
                    return Err(SpecError::new(
                        format!("sites[{i}]"),
                        format!("`{site}` is not a site name"),
                    ));
                }
                if sites[..i].contains(site) {
                    return Err(SpecError::new(
                        format!("sites[{i}]"),
                        format!("`{site}` is listed twice"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Accelerators per node of the first alternative naming `model`.
    pub fn accelerators_for(&self, model: &str) -> Option<u32> {
        self.resources
            .accelerators
            .alternatives
            .iter()
            .find(|(m, _)| m == model)
            .map(|(_, c)| *c)
    }
}

/// The parser's message as the problem: without its position ("at line 3 column 5"),
/// without the path it sometimes repeats in front ("resources.nodes: …", since the field is
/// named apart), and cut short when it quotes back a long value.
fn parser_problem(message: &str, field: &str) -> String {
    let message = match message.find(" at line ") {
        Some(i) => &message[..i],
        None => message,
    };
    let message = message
        .strip_prefix(field)
        .and_then(|rest| rest.strip_prefix(": "))
        .unwrap_or(message);
    // a value the parser quotes back (a whole file read as one string) is cut short
    const LONGEST: usize = 300;
    match message.char_indices().nth(LONGEST) {
        Some((end, _)) => format!("{}…", &message[..end]),
        None => message.to_string(),
    }
}

/// A job's place in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Placed,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Placed,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Placed => "placed",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// Whether the lifecycle allows going from `self` to `next`. Placed and running jobs
    /// may go back to queued when their lease is lost.
    pub fn can_become(self, next: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, next),
            (Queued, Placed)
                | (Queued, Failed)
                | (Queued, Cancelled)
                | (Placed, Running)
                | (Placed, Queued)
                | (Placed, Succeeded)
                | (Placed, Failed)
                | (Placed, Cancelled)
                | (Running, Queued)
                | (Running, Succeeded)
                | (Running, Failed)
                | (Running, Cancelled)
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| {
                let states: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
                format!("unknown job state `{s}`: one of {}", states.join(", "))
            })
    }
}

/// Where a placed job sits: its cluster, the nodes (by index) and what it takes on each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Allocation {
    pub cluster: String,
    pub accelerator: Option<String>,
    pub accelerators_per_node: u32,
    pub cpus_per_node: u32,
    pub memory_gb_per_node: u32,
    pub nodes: Vec<u32>,
    /// The offer's price per accelerator-hour when placed.
    pub price_per_accelerator_hour: Money,
    /// The job's estimated duration on this cluster's model, in seconds, when placed (what
    /// start estimates for later jobs count on); absent in allocations from before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_seconds: Option<u64>,
    /// Staging the job's inputs to this cluster from their vaults, in CNY, as quoted when
    /// placed (billed with the job); absent when nothing moves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging_cny: Option<Money>,
}

impl Allocation {
    pub fn total_accelerators(&self) -> u32 {
        self.accelerators_per_node * self.nodes.len() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name: finetune
resources:
  accelerators: {H800: 8}
  nodes: 2
  cpus: 16
  memory_gb: 64
command: "python train.py"
env: {EPOCHS: "3"}
estimated_duration: 10m
max_price_per_hour: "30.00 CNY"
latency_sensitive: true
"#;

    #[test]
    fn parses_a_good_spec() {
        let spec = JobSpec::from_yaml(GOOD).unwrap();
        assert_eq!(spec.resources.nodes, 2);
        assert_eq!(spec.accelerators_for("H800"), Some(8));
        assert_eq!(spec.estimated_duration.0, Duration::from_secs(600));
        let json = serde_json::to_vec(&spec).unwrap();
        assert_eq!(JobSpec::from_json(&json).unwrap(), spec);
    }

    #[test]
    fn alternatives_keep_their_order() {
        let text = GOOD.replace("{H800: 8}", "[{H800: 8}, {Ascend910B: 8}]");
        let spec = JobSpec::from_yaml(&text).unwrap();
        assert_eq!(
            spec.resources.accelerators.alternatives,
            vec![("H800".to_string(), 8), ("Ascend910B".to_string(), 8)]
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (GOOD.replace("nodes: 2", "nodez: 2"), "resources.nodez"),
            (GOOD.replace("nodes: 2", "nodes: two"), "resources.nodes"),
            (GOOD.replace("nodes: 2", "nodes: 0"), "resources.nodes"),
            (
                GOOD.replace("{H800: 8}", "{H800: 0}"),
                "resources.accelerators",
            ),
            (GOOD.replace("{H800: 8}", "eight"), "resources.accelerators"),
            (GOOD.replace("10m", "ten minutes"), "estimated_duration"),
            (GOOD.replace("30.00 CNY", "30 USD"), "max_price_per_hour"),
            (GOOD.replace("EPOCHS", "BAYGRID_RANK"), "env.BAYGRID_RANK"),
            (GOOD.replace("finetune", "Fine Tune"), "name"),
            (GOOD.replace("python train.py", " "), "command"),
            (format!("{GOOD}\nextra: 1\n"), "extra"),
            (format!("{GOOD}\ninputs: [hk-spend]\n"), "purpose"),
            (
                format!("{GOOD}\ninputs: [hk-spend, hk-spend]\npurpose: risk\n"),
                "inputs[1]",
            ),
            (
                format!("{GOOD}\ninputs: [HK]\npurpose: risk\n"),
                "inputs[0]",
            ),
            (
                format!("{GOOD}\ninputs: [hk-spend]\npurpose: credit risk\n"),
                "purpose",
            ),
            (
                format!("{GOOD}\nallowed_jurisdictions: [XX]\n"),
                "allowed_jurisdictions[0]",
            ),
            ("x".repeat(5000), "spec"),
        ];
        for (text, field) in cases {
            let err = JobSpec::from_yaml(&text).unwrap_err();
            assert_eq!(err.field, field, "{err}");
            assert!(!err.problem.is_empty());
            // the field is named once, not again inside the problem, and a value quoted
            // back is cut short
            assert!(!err.problem.starts_with(&err.field), "{err}");
            assert!(err.problem.chars().count() <= 301, "{err}");
        }
    }

    #[test]
    fn lifecycle() {
        assert!(JobState::Queued.can_become(JobState::Placed));
        assert!(JobState::Running.can_become(JobState::Queued));
        assert!(!JobState::Succeeded.can_become(JobState::Running));
        assert!(!JobState::Cancelled.can_become(JobState::Queued));
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>().unwrap(), s);
        }
    }
}

#[cfg(test)]
mod example_specs {
    use super::*;

    /// Every example the README points to parses and validates.
    #[test]
    fn examples_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) == Some("yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                JobSpec::from_yaml(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 3);
    }
}

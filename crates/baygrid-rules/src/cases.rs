//! Worked cases: the rule pack's `[[case]]` format (a flow request plus `id` and `expect`),
//! run through the same engine the server uses.

use serde::{Deserialize, Serialize};

use crate::{FlowRequest, RuleError, RulePack};

#[derive(Debug, Deserialize)]
struct Expect {
    decision: String,
    #[serde(default)]
    rules: Vec<String>,
    #[serde(default)]
    obligations: Vec<String>,
}

/// What one case got, and whether that is what it expects: the decision, and every rule and
/// obligation it lists among those reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaseOutcome {
    pub id: String,
    pub decision: String,
    pub rules: Vec<String>,
    pub obligations: Vec<String>,
    pub matches: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

fn bad(message: String) -> RuleError {
    RuleError::Invalid {
        field: "case".into(),
        message,
    }
}

impl RulePack {
    /// Runs every case of a cases file (TOML text).
    pub fn check_cases(&self, text: &str) -> Result<Vec<CaseOutcome>, RuleError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let cases = table
            .get("case")
            .and_then(|c| c.as_array())
            .ok_or_else(|| bad("no [[case]] entries".into()))?;
        let mut outcomes = Vec::with_capacity(cases.len());
        for (n, case) in cases.iter().enumerate() {
            let mut case = case
                .as_table()
                .cloned()
                .ok_or_else(|| bad(format!("case {n} is not a table")))?;
            let id = case
                .remove("id")
                .and_then(|v| v.as_str().map(str::to_string))
                .ok_or_else(|| bad(format!("case {n} has no id")))?;
            let expect: Expect = case
                .remove("expect")
                .ok_or_else(|| bad(format!("case {id} has no expect")))?
                .try_into()
                .map_err(|e| bad(format!("case {id}: expect: {e}")))?;
            let request: FlowRequest = toml::Value::Table(case)
                .try_into()
                .map_err(|e| bad(format!("case {id}: {e}")))?;
            let decision = self.decide(&request).map_err(|e| match e {
                RuleError::Invalid { field, message } => {
                    bad(format!("case {id}: {field}: {message}"))
                }
                other => other,
            })?;
            let got = if decision.allowed { "allow" } else { "deny" };
            let obligations: Vec<String> =
                decision.obligations.iter().map(|o| o.id.clone()).collect();
            let mut problems = Vec::new();
            if got != expect.decision {
                problems.push(format!("decision {got}, expected {}", expect.decision));
            }
            let missing: Vec<&String> = expect
                .rules
                .iter()
                .filter(|r| !decision.rules.contains(r))
                .collect();
            if !missing.is_empty() {
                problems.push(format!("rules {missing:?} not reported"));
            }
            let missing: Vec<&String> = expect
                .obligations
                .iter()
                .filter(|o| !obligations.contains(o))
                .collect();
            if !missing.is_empty() {
                problems.push(format!("obligations {missing:?} not reported"));
            }
            outcomes.push(CaseOutcome {
                id,
                decision: got.into(),
                rules: decision.rules,
                obligations,
                matches: problems.is_empty(),
                problem: (!problems.is_empty()).then(|| problems.join("; ")),
            });
        }
        Ok(outcomes)
    }
}

//! Every worked case of the rule pack (pack/cases.toml, the GBA rule pack's own table)
//! through the rules: the decision, and the rules and obligations it must report.

use baygrid_rules::{FlowRequest, RulePack};

#[derive(serde::Deserialize)]
struct Expect {
    decision: String,
    rules: Vec<String>,
    obligations: Vec<String>,
}

#[test]
fn every_worked_case_decides_as_the_pack_says() {
    run_cases(include_str!("../pack/cases.toml"), 27);
}

/// baygrid's own cases: an allow and a deny for every rule that can deny, both sides of
/// every threshold, every obligation id.
#[test]
fn the_projects_own_cases_cover_every_denying_rule_and_obligation() {
    let text = include_str!("../pack/baygrid-cases.toml");
    run_cases(text, 28);
    let table: toml::Table = toml::from_str(text).unwrap();
    let mut allowed_by = std::collections::BTreeSet::new();
    let mut denied_by = std::collections::BTreeSet::new();
    let mut obligations = std::collections::BTreeSet::new();
    for case in table["case"].as_array().unwrap() {
        let expect = &case["expect"];
        let rules: Vec<String> = expect["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_string())
            .collect();
        if expect["decision"].as_str() == Some("allow") {
            allowed_by.extend(rules);
        } else {
            denied_by.extend(rules);
        }
        for o in expect["obligations"].as_array().unwrap() {
            obligations.insert(o.as_str().unwrap().to_string());
        }
    }
    for rule in [
        "CN-IMPORTANT",
        "CN-CIIO",
        "CN-PI-SA",
        "CN-PI-SC",
        "CN-CONSENT",
        "HK-DPP3",
        "MO-ADEQUATE",
    ] {
        assert!(
            allowed_by.contains(rule) || rule == "CN-IMPORTANT",
            "no allow case for {rule}"
        );
        assert!(
            denied_by.contains(rule) || rule == "CN-IMPORTANT",
            "no deny case for {rule}"
        );
    }
    for rule in ["CN-CORE", "GBA-ONWARD"] {
        assert!(denied_by.contains(rule), "no deny case for {rule}");
    }
    for id in [
        "file-standard-contract",
        "impact-assessment",
        "separate-consent",
        "notice",
        "recipient-records-3y",
        "model-clauses",
    ] {
        assert!(obligations.contains(id), "no case expects obligation {id}");
    }
}

fn run_cases(text: &str, expected_count: usize) {
    let table: toml::Table = toml::from_str(text).unwrap();
    let cases = table["case"].as_array().unwrap();
    assert_eq!(cases.len(), expected_count);
    let pack = RulePack::load().unwrap();
    let mut failures = Vec::new();
    for case in cases {
        let mut case = case.as_table().unwrap().clone();
        let id = case.remove("id").unwrap().as_str().unwrap().to_string();
        let expect: Expect = case.remove("expect").unwrap().try_into().unwrap();
        let request: FlowRequest = toml::Value::Table(case)
            .try_into()
            .unwrap_or_else(|e| panic!("case {id}: {e}"));
        let decision = pack
            .decide(&request)
            .unwrap_or_else(|e| panic!("case {id}: {e}"));
        let got = if decision.allowed { "allow" } else { "deny" };
        let missing_rules: Vec<&String> = expect
            .rules
            .iter()
            .filter(|r| !decision.rules.contains(r))
            .collect();
        let missing_obligations: Vec<&String> = expect
            .obligations
            .iter()
            .filter(|o| !decision.obligations.iter().any(|d| &d.id == *o))
            .collect();
        if got != expect.decision || !missing_rules.is_empty() || !missing_obligations.is_empty() {
            failures.push(format!(
                "{id}: expected {} with rules {:?} and obligations {:?}; got {got} with rules {:?}, denied by {:?}, obligations {:?}, notes {:?}",
                expect.decision,
                expect.rules,
                expect.obligations,
                decision.rules,
                decision.denied_by,
                decision.obligations.iter().map(|o| &o.id).collect::<Vec<_>>(),
                decision.notes
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Removing any required field from any case's request is an error, never a decision.
#[test]
fn a_request_missing_any_field_is_an_error() {
    let text = include_str!("../pack/cases.toml");
    let table: toml::Table = toml::from_str(text).unwrap();
    let optional = ["evidence", "filed", "dataset"];
    let mut checked = 0;
    for case in table["case"].as_array().unwrap() {
        let mut request = case.as_table().unwrap().clone();
        request.remove("id");
        request.remove("expect");
        for key in request.keys().cloned().collect::<Vec<_>>() {
            let mut paths = vec![(key.clone(), None)];
            if let Some(inner) = request[&key].as_table() {
                paths.extend(inner.keys().map(|k| (key.clone(), Some(k.clone()))));
            }
            for (outer, inner) in paths {
                let name = inner.clone().unwrap_or_else(|| outer.clone());
                if optional.contains(&name.as_str()) {
                    continue;
                }
                let mut broken = request.clone();
                match &inner {
                    None => {
                        broken.remove(&outer);
                    }
                    Some(k) => {
                        broken
                            .get_mut(&outer)
                            .and_then(|v| v.as_table_mut())
                            .unwrap()
                            .remove(k);
                    }
                }
                let parsed: Result<FlowRequest, _> = toml::Value::Table(broken).try_into();
                assert!(
                    parsed.is_err(),
                    "without {outer}.{name} the request still parsed"
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 27 * 20, "only {checked} removals checked");
}

//! Every worked case of the rule pack (pack/cases.toml, the GBA rule pack's own table)
//! through the rules: the decision, and the rules and obligations it must report.

use baygrid_rules::{FlowRequest, RulePack};

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
    let outcomes = RulePack::load().unwrap().check_cases(text).unwrap();
    assert_eq!(outcomes.len(), expected_count);
    let failures: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.matches)
        .map(|o| {
            format!(
                "{}: {} (got {} with rules {:?}, obligations {:?})",
                o.id,
                o.problem.clone().unwrap_or_default(),
                o.decision,
                o.rules,
                o.obligations
            )
        })
        .collect();
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

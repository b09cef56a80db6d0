use super::*;

fn date(text: &str) -> NaiveDate {
    NaiveDate::from_str(text).unwrap()
}

#[test]
fn the_pack_loads_and_has_every_rule_id() {
    let pack = RulePack::load().unwrap();
    for id in [
        "CN-CORE",
        "CN-IMPORTANT",
        "CN-CIIO",
        "CN-NOPI",
        "CN-ABROAD",
        "CN-PURPOSE-EXEMPT",
        "CN-PI-SA",
        "CN-PI-SC",
        "CN-PI-EXEMPT",
        "CN-CONSENT",
        "GBA-SC",
        "EVIDENCE-VALID",
        "SC-FILING",
        "GBA-ONWARD",
        "HK-NOPI",
        "HK-DPP3",
        "HK-GBA",
        "HK-MODEL",
        "MO-NOPI",
        "MO-ADEQUATE",
        "IN-CN",
        "DOMESTIC",
        "IN-OTHER",
        "DERIVED-ANON",
        "DERIVED-MODEL",
    ] {
        assert!(pack.rule_ids().iter().any(|r| r == id), "rule {id} missing");
    }
    assert_eq!(pack.rule_ids().len(), 25);
}

#[test]
fn filing_is_due_on_the_tenth_working_day() {
    // Monday 2 February 2026: the 10th working day after is Monday 16 February
    assert_eq!(filing_due(date("2026-02-02"), 10), date("2026-02-16"));
    // Wednesday 25 November 2026: Wednesday 9 December
    assert_eq!(filing_due(date("2026-11-25"), 10), date("2026-12-09"));
    // from a Saturday, the weekend does not count
    assert_eq!(filing_due(date("2026-11-28"), 10), date("2026-12-11"));
}

fn request() -> FlowRequest {
    FlowRequest {
        today: date("2026-11-28"),
        exporter: Exporter {
            name: "sz-clinic".into(),
            jurisdiction: Region::CN,
            city: "shenzhen".into(),
            ciio: false,
        },
        recipient: Recipient {
            name: "hk-lab".into(),
            jurisdiction: Region::HK,
            city: "hong-kong".into(),
        },
        data: DataFacts {
            name: "patients".into(),
            level: Level::General,
            personal: Personal::Personal,
            subjects: 10,
            collected_abroad: false,
            collection_purposes: vec!["research".into()],
            arrived_under: String::new(),
        },
        flow: Flow {
            mode: Mode::Copy,
            purpose: "research".into(),
            destination: Region::HK,
            destination_city: "hong-kong".into(),
            exported_personal: 0,
            exported_sensitive: 0,
        },
        evidence: vec![Evidence {
            kind: EvidenceKind::SeparateConsent,
            exporter: "sz-clinic".into(),
            recipient: "hk-lab".into(),
            effective: date("2026-01-05"),
            filed: None,
            dataset: None,
        }],
    }
}

#[test]
fn bad_requests_name_the_field() {
    let pack = RulePack::load().unwrap();
    let mut r = request();
    r.flow.destination_city = " ".into();
    match pack.decide(&r) {
        Err(RuleError::Invalid { field, .. }) => assert_eq!(field, "flow.destination_city"),
        other => panic!("{other:?}"),
    }
    let mut r = request();
    r.data.arrived_under = "a handshake".into();
    assert!(
        matches!(pack.decide(&r), Err(RuleError::Invalid { field, .. }) if field == "data.arrived_under")
    );
    let mut r = request();
    r.evidence.push(Evidence {
        kind: EvidenceKind::StandardContract,
        exporter: "sz-clinic".into(),
        recipient: "hk-lab".into(),
        effective: date("2026-01-05"),
        filed: Some("soon".into()),
        dataset: None,
    });
    assert!(
        matches!(pack.decide(&r), Err(RuleError::Invalid { field, .. }) if field == "evidence[1].filed")
    );
    // unknown fields and unknown values are refused when the request is read
    let mut json = serde_json::to_value(request()).unwrap();
    json["flow"]["speed"] = serde_json::json!("fast");
    let err = serde_json::from_value::<FlowRequest>(json).unwrap_err();
    assert!(err.to_string().contains("speed"), "{err}");
    let mut json = serde_json::to_value(request()).unwrap();
    json["data"]["level"] = serde_json::json!("secret");
    assert!(serde_json::from_value::<FlowRequest>(json).is_err());
}

#[test]
fn an_allowed_counting_flow_reports_its_category() {
    let pack = RulePack::load().unwrap();
    let decision = pack.decide(&request()).unwrap();
    assert!(decision.allowed, "{decision:?}");
    assert_eq!(decision.counts, Some((ExportCategory::Personal, 10)));
    assert!(decision
        .evidence_used
        .iter()
        .any(|e| e.starts_with("separate_consent")));
    // the same flow collected abroad is allowed without counting
    let mut r = request();
    r.data.collected_abroad = true;
    r.evidence.clear();
    let decision = pack.decide(&r).unwrap();
    assert!(decision.allowed);
    assert_eq!(decision.rules, vec!["CN-ABROAD".to_string()]);
    assert_eq!(decision.counts, None);
}

#[test]
fn evidence_for_someone_else_does_not_count() {
    let pack = RulePack::load().unwrap();
    let mut r = request();
    r.evidence[0].recipient = "another-lab".into();
    let decision = pack.decide(&r).unwrap();
    assert!(!decision.allowed);
    assert!(decision.rules.iter().any(|r| r == "EVIDENCE-VALID"));
    assert_eq!(decision.denied_by, vec!["CN-CONSENT".to_string()]);
    assert!(
        decision.remedies[0].contains("separate_consent"),
        "{:?}",
        decision.remedies
    );
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn region() -> impl Strategy<Value = Region> {
        prop_oneof![
            Just(Region::CN),
            Just(Region::HK),
            Just(Region::MO),
            Just(Region::INTL)
        ]
    }

    fn arbitrary_request() -> impl Strategy<Value = FlowRequest> {
        (
            region(),
            region(),
            prop_oneof![
                Just(Level::General),
                Just(Level::Important),
                Just(Level::Core)
            ],
            prop_oneof![
                Just(Personal::None),
                Just(Personal::Personal),
                Just(Personal::Sensitive)
            ],
            prop_oneof![
                Just(Mode::Copy),
                Just(Mode::RemoteAccess),
                Just(Mode::QueryResult),
                Just(Mode::ModelUpdate)
            ],
            0u64..2_000_000,
            0u64..2_000_000,
            any::<bool>(),
            any::<bool>(),
            prop::sample::select(vec!["shenzhen", "shaoguan", "zhuhai", "hong-kong"]),
            prop::sample::subsequence(
                vec![
                    EvidenceKind::SecurityAssessment,
                    EvidenceKind::StandardContract,
                    EvidenceKind::GbaContractHk,
                    EvidenceKind::GbaContractMo,
                    EvidenceKind::SeparateConsent,
                    EvidenceKind::HkPrescribedConsent,
                    EvidenceKind::MoConsent,
                ],
                0..4,
            ),
        )
            .prop_map(
                |(
                    from,
                    to,
                    level,
                    personal,
                    mode,
                    subjects,
                    exported,
                    ciio,
                    abroad,
                    city,
                    kinds,
                )| {
                    let mut r = request();
                    r.exporter.jurisdiction = from;
                    r.exporter.ciio = ciio;
                    r.exporter.city = city.into();
                    r.recipient.jurisdiction = to;
                    r.flow.destination = to;
                    r.flow.destination_city = city.into();
                    r.flow.mode = mode;
                    r.flow.exported_personal = exported;
                    r.flow.exported_sensitive = exported / 100;
                    r.data.level = level;
                    r.data.personal = personal;
                    r.data.subjects = if personal == Personal::None {
                        0
                    } else {
                        subjects
                    };
                    r.data.collected_abroad = abroad;
                    r.evidence = kinds
                        .into_iter()
                        .map(|kind| Evidence {
                            kind,
                            exporter: "sz-clinic".into(),
                            recipient: "hk-lab".into(),
                            effective: date("2026-01-05"),
                            filed: kind.is_contract().then(|| "2026-01-09".to_string()),
                            dataset: Some("patients".into()),
                        })
                        .collect();
                    r
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn decisions_are_explained_and_core_data_never_leaves(r in arbitrary_request()) {
            let pack = RulePack::load().unwrap();
            let decision = pack.decide(&r).unwrap();
            // the facts the engine builds conform to the schema the policies are checked against
            let checked = pack.cedar_request(&r);
            prop_assert!(checked.is_ok());
            // the facts go to Cedar directly in decisions: the same policies match as when
            // they are read through Cedar's JSON reader against the schema
            prop_assert_eq!(
                pack.evaluate_merged(&checked.unwrap()),
                pack.evaluate_merged(&pack.prepare(&r).unwrap())
            );
            // every decision names the rules it rests on
            prop_assert!(!decision.rules.is_empty() || !decision.allowed);
            if decision.allowed {
                prop_assert!(decision.denied_by.is_empty());
            } else {
                prop_assert!(!decision.remedies.is_empty());
                prop_assert!(decision.obligations.is_empty());
                prop_assert!(decision.counts.is_none());
            }
            if r.exporter.jurisdiction == Region::CN
                && r.flow.destination != Region::CN
                && r.data.level == Level::Core
            {
                prop_assert!(!decision.allowed);
                prop_assert!(decision.denied_by.contains(&"CN-CORE".to_string()));
            }
            // the same request decides the same way
            prop_assert_eq!(pack.decide(&r).unwrap(), decision);
        }

        #[test]
        fn a_request_missing_any_field_is_an_error_never_an_allow(r in arbitrary_request()) {
            // every key of the request, at every depth, except those optional by design
            // (the evidence list, and a piece of evidence's filing date and data set)
            fn paths(value: &serde_json::Value, at: &str, out: &mut Vec<String>) {
                match value {
                    serde_json::Value::Object(map) => {
                        for (key, inner) in map {
                            let path = format!("{at}/{key}");
                            if !matches!(key.as_str(), "evidence" | "filed" | "dataset") {
                                out.push(path.clone());
                            }
                            paths(inner, &path, out);
                        }
                    }
                    serde_json::Value::Array(items) => {
                        for (i, inner) in items.iter().enumerate() {
                            paths(inner, &format!("{at}/{i}"), out);
                        }
                    }
                    _ => {}
                }
            }
            let whole = serde_json::to_value(&r).unwrap();
            let mut all = Vec::new();
            paths(&whole, "", &mut all);
            prop_assert!(all.len() > 15);
            for path in all {
                let (parent, key) = path.rsplit_once('/').unwrap();
                let mut cut = whole.clone();
                let removed = match cut.pointer_mut(parent).unwrap_or(&mut serde_json::Value::Null) {
                    serde_json::Value::Object(map) => map.remove(key).is_some(),
                    _ => false,
                };
                prop_assert!(removed, "{path}");
                let parsed = serde_json::from_value::<FlowRequest>(cut);
                prop_assert!(parsed.is_err(), "a request without {path} was accepted");
            }
        }
    }
}

#[test]
fn an_edited_pack_file_changes_decisions_without_a_rebuild() {
    let builtin = include_str!("../pack/pack.toml");
    let mut r = request();
    r.data.subjects = 60_000;
    r.flow.exported_personal = 0;
    let pack = RulePack::load().unwrap();
    let decision = pack.decide(&r).unwrap();
    assert!(decision.allowed, "{decision:?}");
    assert_eq!(decision.pack_version, "gba-2024.09.1");
    // lower the contract threshold below the flow: it now needs a contract
    let edited = builtin
        .replace("personal_contract = 100000", "personal_contract = 50000")
        .replace("version = \"gba-2024.09.1\"", "version = \"test-2\"");
    let dir = std::env::temp_dir().join(format!("baygrid-pack-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pack.toml");
    std::fs::write(&path, edited).unwrap();
    let pack = RulePack::from_file(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let decision = pack.decide(&r).unwrap();
    assert!(!decision.allowed);
    assert_eq!(decision.denied_by, vec!["CN-PI-SC".to_string()]);
    assert_eq!(decision.pack_version, "test-2");
    // shrink the city list: Shenzhen is no longer a GBA city, so GBA-SC no longer applies
    let mut gba = request();
    gba.data.subjects = 150_000;
    gba.evidence.push(Evidence {
        kind: EvidenceKind::GbaContractHk,
        exporter: "sz-clinic".into(),
        recipient: "hk-lab".into(),
        effective: date("2026-01-05"),
        filed: Some("2026-01-09".into()),
        dataset: None,
    });
    assert!(RulePack::load().unwrap().decide(&gba).unwrap().allowed);
    let no_shenzhen = builtin.replace("\"shenzhen\", ", "");
    let pack = RulePack::from_file(&no_shenzhen).unwrap();
    assert!(!pack.decide(&gba).unwrap().allowed);
    // a broken pack file is an error naming the field
    let broken = builtin.replace(
        "personal_assessment = 1000000",
        "personal_assessment = \"many\"",
    );
    let err = RulePack::from_file(&broken).err().unwrap().to_string();
    assert!(err.contains("personal_assessment"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_decision_names_the_contract_it_rests_on() {
    let pack = RulePack::load().unwrap();
    let request: FlowRequest = toml::from_str(include_str!(
        "../../../examples/flows/sz-clinic-to-hk-lab.toml"
    ))
    .unwrap();
    let decision = pack.decide(&request).unwrap();
    assert_eq!(decision.contract_used(), Some(EvidenceKind::GbaContractHk));
    let mut without = request.clone();
    without.evidence.retain(|e| !e.kind.is_contract());
    assert_eq!(pack.decide(&without).unwrap().contract_used(), None);
}

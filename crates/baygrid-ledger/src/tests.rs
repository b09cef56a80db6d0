use super::*;
use proptest::prelude::*;

fn account(id: &str, currency: Currency, kind: AccountKind) -> Account {
    Account {
        id: id.into(),
        owner: id.into(),
        currency,
        kind,
        debits_must_not_exceed_credits: kind == AccountKind::TenantWallet,
    }
}

fn t(id: &str, debit: &str, credit: &str, amount: i64, kind: TransferKind) -> Transfer {
    Transfer {
        id: id.into(),
        debit_account: debit.into(),
        credit_account: credit.into(),
        amount,
        currency: Currency::CNY,
        kind,
        linked: false,
        reference: String::new(),
    }
}

fn ledger() -> Ledger {
    let mut l = Ledger::new();
    l.open(account(
        "funding",
        Currency::CNY,
        AccountKind::ExternalFunding,
    ));
    l.open(account("wallet", Currency::CNY, AccountKind::TenantWallet));
    l.open(account(
        "provider",
        Currency::CNY,
        AccountKind::ProviderRevenue,
    ));
    l.open(account("fees", Currency::CNY, AccountKind::PlatformFees));
    l
}

fn ok(l: &mut Ledger, transfer: Transfer) {
    assert_eq!(l.apply(&[transfer], 0), vec![Ok(Outcome::Created)]);
}

#[test]
fn a_wallet_never_goes_below_zero_holds_included() {
    let mut l = ledger();
    ok(
        &mut l,
        t("d1", "funding", "wallet", 10_000, TransferKind::Single),
    );
    ok(
        &mut l,
        t(
            "h1",
            "wallet",
            "provider",
            8_000,
            TransferKind::Pending { expires_at: 1_000 },
        ),
    );
    assert_eq!(l.balance("wallet").unwrap().available(), 2_000);
    let refused = l.apply(
        &[t("s1", "wallet", "provider", 2_001, TransferKind::Single)],
        0,
    );
    assert_eq!(
        refused,
        vec![Err(TransferError::ExceedsCredits {
            account: "wallet".into(),
            needed: 2_001,
            available: 2_000
        })]
    );
    ok(
        &mut l,
        t("s2", "wallet", "provider", 2_000, TransferKind::Single),
    );
}

#[test]
fn a_hold_posts_part_and_releases_the_rest_at_most_once() {
    let mut l = ledger();
    ok(
        &mut l,
        t("d1", "funding", "wallet", 10_000, TransferKind::Single),
    );
    ok(
        &mut l,
        t(
            "h1",
            "wallet",
            "provider",
            6_000,
            TransferKind::Pending { expires_at: 1_000 },
        ),
    );
    ok(
        &mut l,
        t(
            "p1",
            "wallet",
            "provider",
            4_500,
            TransferKind::Post {
                pending_id: "h1".into(),
            },
        ),
    );
    let wallet = l.balance("wallet").unwrap();
    assert_eq!(
        (
            wallet.debits_posted,
            wallet.debits_pending,
            wallet.available()
        ),
        (4_500, 0, 5_500)
    );
    assert_eq!(l.balance("provider").unwrap().net(), 4_500);
    assert_eq!(
        l.apply(
            &[t(
                "p2",
                "wallet",
                "provider",
                1,
                TransferKind::Post {
                    pending_id: "h1".into()
                }
            )],
            0
        ),
        vec![Err(TransferError::AlreadyResolved("h1".into()))]
    );
    assert_eq!(
        l.apply(
            &[t(
                "v1",
                "wallet",
                "provider",
                0,
                TransferKind::Void {
                    pending_id: "h1".into()
                }
            )],
            0
        ),
        vec![Err(TransferError::AlreadyResolved("h1".into()))]
    );
    ok(
        &mut l,
        t(
            "h2",
            "wallet",
            "provider",
            1_000,
            TransferKind::Pending { expires_at: 1_000 },
        ),
    );
    assert_eq!(
        l.apply(
            &[t(
                "p3",
                "wallet",
                "provider",
                1_001,
                TransferKind::Post {
                    pending_id: "h2".into()
                }
            )],
            0
        ),
        vec![Err(TransferError::ExceedsPending {
            amount: 1_001,
            pending: 1_000
        })]
    );
    assert_eq!(
        l.apply(
            &[t(
                "p4",
                "wallet",
                "fees",
                10,
                TransferKind::Post {
                    pending_id: "h2".into()
                }
            )],
            0
        ),
        vec![Err(TransferError::PendingMismatch)]
    );
}

#[test]
fn holds_expire_and_cannot_be_posted_afterwards() {
    let mut l = ledger();
    ok(
        &mut l,
        t("d1", "funding", "wallet", 1_000, TransferKind::Single),
    );
    ok(
        &mut l,
        t(
            "h1",
            "wallet",
            "provider",
            1_000,
            TransferKind::Pending { expires_at: 50 },
        ),
    );
    assert!(l.expire(49).is_empty());
    assert_eq!(l.expire(50), vec!["h1".to_string()]);
    assert_eq!(l.balance("wallet").unwrap().available(), 1_000);
    assert_eq!(
        l.apply(
            &[t(
                "p1",
                "wallet",
                "provider",
                10,
                TransferKind::Post {
                    pending_id: "h1".into()
                }
            )],
            60
        ),
        vec![Err(TransferError::PendingExpired("h1".into()))]
    );
}

#[test]
fn retries_are_idempotent_and_conflicting_ids_are_refused() {
    let mut l = ledger();
    let deposit = t("d1", "funding", "wallet", 1_000, TransferKind::Single);
    ok(&mut l, deposit.clone());
    assert_eq!(
        l.apply(std::slice::from_ref(&deposit), 0),
        vec![Ok(Outcome::AlreadyExists)]
    );
    assert_eq!(l.balance("wallet").unwrap().net(), 1_000);
    let mut other = deposit;
    other.amount = 2_000;
    assert_eq!(
        l.apply(&[other], 0),
        vec![Err(TransferError::ExistsWithDifferentBody("d1".into()))]
    );
}

#[test]
fn linked_chains_succeed_or_fail_together() {
    let mut l = ledger();
    ok(
        &mut l,
        t("d1", "funding", "wallet", 1_000, TransferKind::Single),
    );
    let mut first = t("c1", "wallet", "provider", 900, TransferKind::Single);
    first.linked = true;
    let second = t("c2", "wallet", "fees", 200, TransferKind::Single);
    let results = l.apply(&[first.clone(), second], 0);
    assert_eq!(results[0], Err(TransferError::LinkedEventFailed));
    assert!(matches!(
        results[1],
        Err(TransferError::ExceedsCredits { .. })
    ));
    assert_eq!(
        l.balance("wallet").unwrap().net(),
        1_000,
        "the first transfer was rolled back"
    );
    assert!(l.transfer("c1").is_none());
    let open = l.apply(&[first], 0);
    assert_eq!(open, vec![Err(TransferError::LinkedChainOpen)]);
}

#[test]
fn bad_transfers_are_refused_with_reasons() {
    let mut l = ledger();
    l.open(account(
        "hk-wallet",
        Currency::HKD,
        AccountKind::TenantWallet,
    ));
    assert_eq!(
        l.apply(&[t("x1", "funding", "wallet", 0, TransferKind::Single)], 0),
        vec![Err(TransferError::AmountNotPositive)]
    );
    assert_eq!(
        l.apply(&[t("x2", "wallet", "wallet", 1, TransferKind::Single)], 0),
        vec![Err(TransferError::SameAccount)]
    );
    assert_eq!(
        l.apply(&[t("x3", "funding", "ghost", 1, TransferKind::Single)], 0),
        vec![Err(TransferError::NoSuchAccount("ghost".into()))]
    );
    assert!(matches!(
        l.apply(
            &[t("x4", "funding", "hk-wallet", 1, TransferKind::Single)],
            0
        )[0],
        Err(TransferError::CurrencyMismatch { .. })
    ));
}

#[test]
fn fx_is_a_linked_pair_through_fx_accounts_at_the_recorded_rate() {
    let mut l = ledger();
    l.open(account(
        "hk-funding",
        Currency::HKD,
        AccountKind::ExternalFunding,
    ));
    l.open(account(
        "hk-wallet",
        Currency::HKD,
        AccountKind::TenantWallet,
    ));
    l.open(account("fx-hkd", Currency::HKD, AccountKind::Fx));
    l.open(account("fx-cny", Currency::CNY, AccountKind::Fx));
    let mut deposit = t("d1", "hk-funding", "hk-wallet", 3_000, TransferKind::Single);
    deposit.currency = Currency::HKD;
    ok(&mut l, deposit);
    let (pair, converted) = fx_pair(
        "fx1",
        ("hk-wallet", Currency::HKD),
        "fx-hkd",
        "fx-cny",
        ("provider", Currency::CNY),
        3_000,
        "0.92".parse().unwrap(),
        "1".parse().unwrap(),
        "job_1",
    );
    assert_eq!(converted, 2_760);
    assert_eq!(
        l.apply(&pair, 0),
        vec![Ok(Outcome::Created), Ok(Outcome::Created)]
    );
    assert_eq!(l.balance("provider").unwrap().net(), 2_760);
    assert_eq!(l.balance("hk-wallet").unwrap().net(), 0);
    assert!(pair[0].reference.contains("0.92"));
}

#[derive(Debug, Clone)]
enum Op {
    Deposit(i64),
    Spend(i64),
    Hold(i64, i64),
    Post(usize, i64),
    Void(usize),
    Expire(i64),
    Retry(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1i64..5_000).prop_map(Op::Deposit),
        (1i64..5_000).prop_map(Op::Spend),
        (1i64..5_000, 0i64..100).prop_map(|(a, e)| Op::Hold(a, e)),
        (0usize..50, 0i64..6_000).prop_map(|(i, a)| Op::Post(i, a)),
        (0usize..50).prop_map(Op::Void),
        (0i64..100).prop_map(Op::Expire),
        (0usize..200).prop_map(Op::Retry),
    ]
}

proptest! {
    /// After any sequence of operations with retries: debits equal credits, posted and
    /// pending; the wallet never goes below zero; a hold resolves at most once.
    #[test]
    fn invariants_hold(ops in proptest::collection::vec(op(), 1..120)) {
        let mut l = ledger();
        let mut applied: Vec<Transfer> = Vec::new();
        let mut holds: Vec<String> = Vec::new();
        let mut now = 0;
        for (n, op) in ops.into_iter().enumerate() {
            let id = format!("t{n}");
            let transfer = match op {
                Op::Deposit(a) => Some(t(&id, "funding", "wallet", a, TransferKind::Single)),
                Op::Spend(a) => Some(t(&id, "wallet", "provider", a, TransferKind::Single)),
                Op::Hold(a, e) => Some(t(&id, "wallet", "provider", a, TransferKind::Pending { expires_at: now + e })),
                Op::Post(i, a) => holds.get(i).map(|h| t(&id, "wallet", "provider", a.max(1), TransferKind::Post { pending_id: h.clone() })),
                Op::Void(i) => holds.get(i).map(|h| t(&id, "wallet", "provider", 0, TransferKind::Void { pending_id: h.clone() })),
                Op::Expire(dt) => {
                    now += dt;
                    l.expire(now);
                    None
                }
                Op::Retry(i) => applied.get(i).cloned(),
            };
            if let Some(transfer) = transfer {
                let result = l.apply(std::slice::from_ref(&transfer), now);
                if result[0] == Ok(Outcome::Created) {
                    if matches!(transfer.kind, TransferKind::Pending { .. }) {
                        holds.push(transfer.id.clone());
                    }
                    applied.push(transfer);
                }
            }
            let (mut dp, mut cp, mut dq, mut cq) = (0i128, 0i128, 0i128, 0i128);
            for (_, b) in l.balances() {
                dp += b.debits_posted;
                cp += b.credits_posted;
                dq += b.debits_pending;
                cq += b.credits_pending;
            }
            prop_assert_eq!(dp, cp);
            prop_assert_eq!(dq, cq);
            let wallet = l.balance("wallet").unwrap();
            prop_assert!(wallet.available() >= 0, "{wallet:?}");
            prop_assert!(wallet.debits_pending >= 0);
        }
        for hold in &holds {
            let resolutions = applied
                .iter()
                .filter(|t| matches!(&t.kind, TransferKind::Post { pending_id } | TransferKind::Void { pending_id } if pending_id == hold))
                .count();
            prop_assert!(resolutions <= 1, "hold {hold} resolved {resolutions} times");
        }
    }
}

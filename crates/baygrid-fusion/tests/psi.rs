mod common;

use std::collections::HashSet;

use baygrid_fusion::psi::{align, run_loopback, PsiKey, Reveal};
use proptest::prelude::*;

fn ids(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn plain(a: &[String], b: &[String]) -> Vec<String> {
    let b: HashSet<&String> = b.iter().collect();
    let mut seen = HashSet::new();
    a.iter()
        .filter(|x| b.contains(x) && seen.insert(*x))
        .cloned()
        .collect()
}

#[test]
fn both_parties_learn_the_intersection_in_their_own_order() {
    let g = ids(&["a", "b", "c", "d"]);
    let h = ids(&["d", "x", "b", "y", "z"]);
    let (go, ho) = run_loopback(&g, &h, Reveal::Both, 2).unwrap();
    assert_eq!(go.intersection.unwrap(), ids(&["b", "d"]));
    assert_eq!(ho.intersection.unwrap(), ids(&["d", "b"]));
    assert_eq!((go.own_size, go.peer_size), (4, 5));
    assert_eq!((ho.own_size, ho.peer_size), (5, 4));
    assert_eq!(go.bytes_sent, ho.bytes_received);
}

#[test]
fn designated_mode_tells_only_the_guest() {
    let g = ids(&["1", "2", "3"]);
    let h = ids(&["3", "4"]);
    let (go, ho) = run_loopback(&g, &h, Reveal::Designated, 16).unwrap();
    assert_eq!(go.intersection.unwrap(), ids(&["3"]));
    assert_eq!(ho.intersection, None);
    assert_eq!(ho.peer_size, 3);
    // The host never gets its own points back: it sends only its own
    // blinded ids and the echo of the guest's.
    assert!(go.bytes_sent < ho.bytes_sent);
}

#[test]
fn empty_disjoint_and_duplicate_sets() {
    let empty: Vec<String> = Vec::new();
    let (go, ho) = run_loopback(&empty, &ids(&["a"]), Reveal::Both, 4).unwrap();
    assert_eq!(go.intersection.unwrap(), empty);
    assert_eq!(ho.intersection.unwrap(), empty);
    let (go, _) = run_loopback(&empty, &empty, Reveal::Both, 4).unwrap();
    assert_eq!(go.intersection.unwrap(), empty);

    let (go, ho) = run_loopback(&ids(&["a", "b"]), &ids(&["c", "d"]), Reveal::Both, 1).unwrap();
    assert!(go.intersection.unwrap().is_empty());
    assert!(ho.intersection.unwrap().is_empty());

    let (go, ho) = run_loopback(
        &ids(&["a", "a", "b", "a"]),
        &ids(&["b", "b", "a"]),
        Reveal::Both,
        3,
    )
    .unwrap();
    assert_eq!(go.intersection.unwrap(), ids(&["a", "b"]));
    assert_eq!(ho.intersection.unwrap(), ids(&["b", "a"]));
    assert_eq!((go.own_size, go.peer_size), (2, 2));
}

#[test]
fn blinding_commutes_and_hides_the_id() {
    let mut rng = rand::rngs::OsRng;
    let (a, b) = (PsiKey::random(&mut rng), PsiKey::random(&mut rng));
    let x = ["42"];
    let ab = b.reblind(&a.blind(&x), 0, "t").unwrap();
    let ba = a.reblind(&b.blind(&x), 0, "t").unwrap();
    assert_eq!(ab, ba);
    assert_ne!(a.blind(&x), b.blind(&x));
    let err = a.reblind(&[[0xff; 32]], 7, "blinded-ids").unwrap_err();
    assert!(err.to_string().contains("position 7"), "{err}");
}

/// The shipped guest and host files hold the same ids in the same order, so
/// each side first drops a seeded 25% of its rows.
fn fate_case(guest: &str, host: &str) {
    let g = common::fate(guest).sample(0.75, 1);
    let h = common::fate(host).sample(0.75, 2);
    let expected = plain(&g.ids, &h.ids);
    assert!(expected.len() < g.rows() && expected.len() > g.rows() / 2);
    let (go, ho) = run_loopback(&g.ids, &h.ids, Reveal::Both, 1024).unwrap();
    let gi = go.intersection.unwrap();
    assert_eq!(gi, expected);
    let hi: HashSet<String> = ho.intersection.unwrap().into_iter().collect();
    assert_eq!(hi, expected.iter().cloned().collect::<HashSet<_>>());
    // Alignment puts the same id on the same row on both sides.
    let (ga, ha) = (align(&g.ids, &gi), align(&h.ids, &gi));
    assert_eq!(g.select(&ga).ids, h.select(&ha).ids);
}

#[test]
fn breast_hetero_intersection_matches_plain() {
    fate_case("breast_hetero_guest.csv", "breast_hetero_host.csv");
}

#[test]
fn default_credit_hetero_intersection_matches_plain() {
    fate_case(
        "default_credit_hetero_guest.csv",
        "default_credit_hetero_host.csv",
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn psi_equals_plain_intersection(
        a in proptest::collection::vec(0u16..200, 0..60),
        b in proptest::collection::vec(0u16..200, 0..60),
        batch in 1usize..9,
    ) {
        let a: Vec<String> = a.iter().map(|x| x.to_string()).collect();
        let b: Vec<String> = b.iter().map(|x| x.to_string()).collect();
        let (go, ho) = run_loopback(&a, &b, Reveal::Both, batch).unwrap();
        prop_assert_eq!(go.intersection.unwrap(), plain(&a, &b));
        prop_assert_eq!(ho.intersection.unwrap(), plain(&b, &a));
    }
}

/// A peer that hangs up, or speaks something else, ends the run with an error.
#[test]
fn a_broken_peer_is_an_error_not_a_hang() {
    use baygrid_fusion::psi::{run_party, Role};
    use std::io::Write;
    let ids: Vec<String> = (0..5000).map(|i| i.to_string()).collect();
    for garbage in [
        &b""[..],
        &b"\x09\x00\x00\x00\x00"[..],
        &b"\x02\xff\xff\xff\xff"[..],
    ] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(garbage).unwrap();
        });
        let stream = std::net::TcpStream::connect(addr).unwrap();
        let reader = stream.try_clone().unwrap();
        let err = run_party(
            Role::Guest,
            &ids,
            Reveal::Both,
            256,
            reader,
            stream,
            &mut rand::rngs::OsRng,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("transport") || text.contains("protocol"),
            "{text}"
        );
        peer.join().unwrap();
    }
}

#[test]
fn a_reveal_mismatch_is_refused() {
    use baygrid_fusion::psi::{run_party, Role};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let host = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let r = s.try_clone().unwrap();
        run_party(
            Role::Host,
            &ids(&["a"]),
            Reveal::Designated,
            4,
            r,
            s,
            &mut rand::rngs::OsRng,
        )
    });
    let s = std::net::TcpStream::connect(addr).unwrap();
    let r = s.try_clone().unwrap();
    let guest = run_party(
        Role::Guest,
        &ids(&["a"]),
        Reveal::Both,
        4,
        r,
        s,
        &mut rand::rngs::OsRng,
    );
    let host = host.join().unwrap();
    let refused = [guest, host]
        .into_iter()
        .filter_map(Result::err)
        .any(|e| e.to_string().contains("settings disagree"));
    assert!(refused);
}

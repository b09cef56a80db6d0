//! Secure aggregation with dropouts (Bonawitz et al., CCS 2017), over the
//! complete graph of parties.
//!
//! Every round each party makes two fresh X25519 key pairs: a *channel*
//! pair, to seal the secret shares it sends to each peer, and a *mask* pair,
//! whose agreement with each peer seeds a ChaCha20 stream (the pairwise
//! mask). It also draws a *self-mask* seed. The mask secret and the self-mask
//! seed are split with Shamir's scheme (threshold `t`, over the scalar field
//! of ristretto255) and one share of each goes to every peer, sealed with
//! ChaCha20-Poly1305.
//!
//! A party's masked input is its encoded update plus its self-mask plus, for
//! each peer, + the pairwise mask when its index is lower and − otherwise.
//! The aggregator only ever sees masked vectors. Pairwise masks cancel in the
//! sum of the parties that sent; for a party that dropped after the keys were
//! shared, the survivors give shares of its mask secret and the aggregator
//! removes its pairwise masks; for each survivor they give shares of its
//! self-mask seed. No party ever gives both shares for the same peer, so the
//! aggregator can never strip both masks from one party's input. With fewer
//! than `t` survivors the round is refused.
//!
//! Updates are encoded as fixed-point numbers in the ring of integers mod
//! 2^32 with [`Params::frac_bits`] fractional bits.

use std::collections::{BTreeMap, BTreeSet};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use curve25519_dalek::scalar::Scalar;
use rand::{CryptoRng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum SecAggError {
    #[error("secure aggregation needs at least 3 parties (got {0}): with two, the sum reveals the other party's update")]
    TooFewParties(usize),
    #[error("threshold {threshold} must be between 2 and the number of parties ({parties})")]
    Threshold { threshold: usize, parties: usize },
    #[error("round refused: {survivors} parties remain, below the threshold of {threshold}")]
    BelowThreshold { survivors: usize, threshold: usize },
    #[error("party {0} is not in this round")]
    UnknownParty(usize),
    #[error("party {party}: the share sealed for it by party {from} does not open")]
    BadEnvelope { party: usize, from: usize },
    #[error("party {party} refuses: party {peer} is named both as a survivor and as dropped")]
    BothShares { party: usize, peer: usize },
    #[error("update has {got} values, the round expects {expected}")]
    Dimension { got: usize, expected: usize },
    #[error("value {value} at position {index} is outside the encodable range ±{limit}")]
    Range {
        index: usize,
        value: f32,
        limit: f32,
    },
    #[error("party {party} is missing a share from party {from}")]
    MissingShare { party: usize, from: usize },
    #[error("protocol: {0}")]
    Protocol(String),
}

/// Round settings, agreed by every party and the aggregator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub parties: usize,
    pub threshold: usize,
    pub dim: usize,
    pub frac_bits: u32,
}

impl Params {
    pub fn new(parties: usize, threshold: usize, dim: usize) -> Result<Self, SecAggError> {
        if parties < 3 {
            return Err(SecAggError::TooFewParties(parties));
        }
        if threshold < 2 || threshold > parties {
            return Err(SecAggError::Threshold { threshold, parties });
        }
        Ok(Params {
            parties,
            threshold,
            dim,
            frac_bits: 16,
        })
    }

    /// The largest magnitude one encoded value (and the sum) may have.
    pub fn limit(&self) -> f32 {
        (1u64 << (31 - self.frac_bits)) as f32 / self.parties as f32
    }

    pub fn encode(&self, update: &[f32]) -> Result<Vec<u32>, SecAggError> {
        if update.len() != self.dim {
            return Err(SecAggError::Dimension {
                got: update.len(),
                expected: self.dim,
            });
        }
        let scale = (1u64 << self.frac_bits) as f64;
        let limit = self.limit();
        update
            .iter()
            .enumerate()
            .map(|(index, &value)| {
                if !value.is_finite() || value.abs() > limit {
                    return Err(SecAggError::Range {
                        index,
                        value,
                        limit,
                    });
                }
                Ok(((value as f64 * scale).round() as i64) as u32)
            })
            .collect()
    }

    pub fn decode(&self, sum: &[u32]) -> Vec<f32> {
        let scale = (1u64 << self.frac_bits) as f64;
        sum.iter()
            .map(|&v| ((v as i32) as f64 / scale) as f32)
            .collect()
    }
}

/// Round 0: a party's public keys, relayed by the aggregator to all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advert {
    pub party: usize,
    pub channel_key: [u8; 32],
    pub mask_key: [u8; 32],
}

/// Round 1: the shares one party seals for one peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    pub from: usize,
    pub to: usize,
    pub sealed: Vec<u8>,
}

/// Round 3: one survivor's answer to the aggregator's unmasking request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnmaskReply {
    pub from: usize,
    /// Shares of survivors' self-mask seeds: (owner, share).
    #[serde(with = "scalars")]
    pub self_mask: Vec<(usize, Scalar)>,
    /// Shares of dropped parties' mask secrets: (owner, share).
    #[serde(with = "scalars")]
    pub mask_secret: Vec<(usize, Scalar)>,
}

/// Shares on the wire: each scalar as its 32 canonical bytes, refused when not canonical.
mod scalars {
    use curve25519_dalek::scalar::Scalar;
    use serde::{de::Error, Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(shares: &[(usize, Scalar)], s: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<(usize, [u8; 32])> =
            shares.iter().map(|(i, v)| (*i, v.to_bytes())).collect();
        bytes.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(usize, Scalar)>, D::Error> {
        let bytes = Vec::<(usize, [u8; 32])>::deserialize(d)?;
        bytes
            .into_iter()
            .map(|(i, b)| {
                Option::<Scalar>::from(Scalar::from_canonical_bytes(b))
                    .map(|v| (i, v))
                    .ok_or_else(|| {
                        D::Error::custom(format!(
                            "the share for party {i} is not a canonical scalar"
                        ))
                    })
            })
            .collect()
    }
}

impl UnmaskReply {
    pub fn wire_len(&self) -> usize {
        8 + (self.self_mask.len() + self.mask_secret.len()) * (8 + 32)
    }
}

impl Advert {
    pub fn wire_len(&self) -> usize {
        8 + 64
    }
}

impl Envelope {
    pub fn wire_len(&self) -> usize {
        16 + self.sealed.len()
    }
}

/// One party's state for one round. Party indices run from 1.
pub struct Client {
    params: Params,
    index: usize,
    channel: StaticSecret,
    mask_secret: Scalar,
    self_seed: Scalar,
    peers: BTreeMap<usize, Advert>,
    /// Shares held for each peer (and itself): (mask secret share, self-mask share).
    held: BTreeMap<usize, (Scalar, Scalar)>,
}

fn secret_from_scalar(s: &Scalar) -> StaticSecret {
    StaticSecret::from(s.to_bytes())
}

impl Client {
    pub fn new<R: RngCore + CryptoRng>(
        params: Params,
        index: usize,
        rng: &mut R,
    ) -> Result<(Client, Advert), SecAggError> {
        if index == 0 || index > params.parties {
            return Err(SecAggError::UnknownParty(index));
        }
        let channel = StaticSecret::random_from_rng(&mut *rng);
        let mask_secret = Scalar::random(rng);
        let advert = Advert {
            party: index,
            channel_key: PublicKey::from(&channel).to_bytes(),
            mask_key: PublicKey::from(&secret_from_scalar(&mask_secret)).to_bytes(),
        };
        let client = Client {
            params,
            index,
            channel,
            mask_secret,
            self_seed: Scalar::random(rng),
            peers: BTreeMap::new(),
            held: BTreeMap::new(),
        };
        Ok((client, advert))
    }

    pub fn index(&self) -> usize {
        self.index
    }

    /// Round 1: learn the peers' keys and seal a share of both secrets for each.
    pub fn share_keys<R: RngCore + CryptoRng>(
        &mut self,
        adverts: &[Advert],
        rng: &mut R,
    ) -> Result<Vec<Envelope>, SecAggError> {
        if adverts.len() < self.params.threshold {
            return Err(SecAggError::BelowThreshold {
                survivors: adverts.len(),
                threshold: self.params.threshold,
            });
        }
        for a in adverts {
            if a.party == 0 || a.party > self.params.parties {
                return Err(SecAggError::UnknownParty(a.party));
            }
            self.peers.insert(a.party, a.clone());
        }
        if !self.peers.contains_key(&self.index) {
            return Err(SecAggError::Protocol(format!(
                "party {} is not among the adverts",
                self.index
            )));
        }
        let n = self.params.parties;
        let t = self.params.threshold;
        let mask_shares = shamir_split(&self.mask_secret, n, t, rng);
        let seed_shares = shamir_split(&self.self_seed, n, t, rng);
        self.held.insert(
            self.index,
            (mask_shares[self.index - 1], seed_shares[self.index - 1]),
        );
        let mut out = Vec::new();
        for (&peer, advert) in &self.peers {
            if peer == self.index {
                continue;
            }
            let mut plain = Vec::with_capacity(64);
            plain.extend_from_slice(mask_shares[peer - 1].as_bytes());
            plain.extend_from_slice(seed_shares[peer - 1].as_bytes());
            let cipher = self.channel_cipher(&advert.channel_key);
            let sealed = cipher
                .encrypt(
                    &nonce(self.index, peer),
                    Payload {
                        msg: &plain,
                        aad: &aad(self.index, peer),
                    },
                )
                .map_err(|_| SecAggError::Protocol("sealing failed".into()))?;
            out.push(Envelope {
                from: self.index,
                to: peer,
                sealed,
            });
        }
        Ok(out)
    }

    /// Round 1, receiving side: open the shares peers sealed for this party.
    pub fn receive_shares(&mut self, envelopes: &[Envelope]) -> Result<(), SecAggError> {
        for e in envelopes {
            if e.to != self.index {
                continue;
            }
            let advert = self
                .peers
                .get(&e.from)
                .ok_or(SecAggError::UnknownParty(e.from))?;
            let cipher = self.channel_cipher(&advert.channel_key);
            let bad = SecAggError::BadEnvelope {
                party: self.index,
                from: e.from,
            };
            let plain = cipher
                .decrypt(
                    &nonce(e.from, self.index),
                    Payload {
                        msg: &e.sealed,
                        aad: &aad(e.from, self.index),
                    },
                )
                .map_err(|_| bad.clone())?;
            let a = scalar_from(&plain[..32]).ok_or_else(|| bad.clone())?;
            let b = scalar_from(&plain[32..64]).ok_or(bad)?;
            self.held.insert(e.from, (a, b));
        }
        Ok(())
    }

    /// Round 2: the masked, encoded update. `senders` are the parties whose
    /// shares this party holds (the round's members after round 1).
    pub fn masked_input(&self, update: &[f32]) -> Result<Vec<u32>, SecAggError> {
        let mut y = self.params.encode(update)?;
        add_stream(&mut y, &seed_bytes(b"self", &self.self_seed), 1);
        let me = secret_from_scalar(&self.mask_secret);
        for (&peer, advert) in &self.peers {
            if peer == self.index || !self.held.contains_key(&peer) {
                continue;
            }
            let seed = pairwise_seed(&me, &advert.mask_key);
            let sign = if self.index < peer { 1 } else { -1 };
            add_stream(&mut y, &seed, sign);
        }
        Ok(y)
    }

    /// Round 3: shares of survivors' self-mask seeds and of dropped parties'
    /// mask secrets. Refuses when a party is named in both lists, or when
    /// fewer than the threshold survived.
    pub fn unmask(
        &self,
        survivors: &[usize],
        dropped: &[usize],
    ) -> Result<UnmaskReply, SecAggError> {
        if survivors.len() < self.params.threshold {
            return Err(SecAggError::BelowThreshold {
                survivors: survivors.len(),
                threshold: self.params.threshold,
            });
        }
        let s: BTreeSet<usize> = survivors.iter().copied().collect();
        if let Some(&peer) = dropped.iter().find(|p| s.contains(p)) {
            return Err(SecAggError::BothShares {
                party: self.index,
                peer,
            });
        }
        let share = |owner: usize| {
            self.held
                .get(&owner)
                .copied()
                .ok_or(SecAggError::MissingShare {
                    party: self.index,
                    from: owner,
                })
        };
        Ok(UnmaskReply {
            from: self.index,
            self_mask: survivors
                .iter()
                .map(|&o| share(o).map(|(_, b)| (o, b)))
                .collect::<Result<_, _>>()?,
            mask_secret: dropped
                .iter()
                .map(|&o| share(o).map(|(a, _)| (o, a)))
                .collect::<Result<_, _>>()?,
        })
    }

    fn channel_cipher(&self, peer_key: &[u8; 32]) -> ChaCha20Poly1305 {
        let shared = self.channel.diffie_hellman(&PublicKey::from(*peer_key));
        let key = Sha256::new()
            .chain_update(b"baygrid-secagg-channel")
            .chain_update(shared.as_bytes())
            .finalize();
        ChaCha20Poly1305::new(Key::from_slice(&key))
    }
}

/// The aggregator's side: it sees adverts, envelopes (sealed), masked
/// vectors and unmasking replies, and outputs only the sum.
pub struct Aggregator {
    params: Params,
    adverts: BTreeMap<usize, Advert>,
    /// Parties that completed round 1 (shared their keys).
    members: BTreeSet<usize>,
    masked: BTreeMap<usize, Vec<u32>>,
}

impl Aggregator {
    pub fn new(params: Params) -> Self {
        Aggregator {
            params,
            adverts: BTreeMap::new(),
            members: BTreeSet::new(),
            masked: BTreeMap::new(),
        }
    }

    pub fn advert(&mut self, advert: Advert) {
        self.adverts.insert(advert.party, advert);
    }

    pub fn adverts(&self) -> Vec<Advert> {
        self.adverts.values().cloned().collect()
    }

    /// Round 1 ends: the parties whose envelopes were relayed.
    pub fn members(&mut self, members: impl IntoIterator<Item = usize>) -> Result<(), SecAggError> {
        self.members = members.into_iter().collect();
        if self.members.len() < self.params.threshold {
            return Err(SecAggError::BelowThreshold {
                survivors: self.members.len(),
                threshold: self.params.threshold,
            });
        }
        Ok(())
    }

    pub fn masked_input(&mut self, party: usize, y: Vec<u32>) -> Result<(), SecAggError> {
        if !self.members.contains(&party) {
            return Err(SecAggError::UnknownParty(party));
        }
        if y.len() != self.params.dim {
            return Err(SecAggError::Dimension {
                got: y.len(),
                expected: self.params.dim,
            });
        }
        self.masked.insert(party, y);
        Ok(())
    }

    /// Who sent a masked input, and who dropped after sharing keys.
    pub fn roster(&self) -> Result<(Vec<usize>, Vec<usize>), SecAggError> {
        let survivors: Vec<usize> = self.masked.keys().copied().collect();
        if survivors.len() < self.params.threshold {
            return Err(SecAggError::BelowThreshold {
                survivors: survivors.len(),
                threshold: self.params.threshold,
            });
        }
        let dropped = self
            .members
            .iter()
            .copied()
            .filter(|p| !self.masked.contains_key(p))
            .collect();
        Ok((survivors, dropped))
    }

    /// Unmask the sum from at least `threshold` replies.
    pub fn finish(&self, replies: &[UnmaskReply]) -> Result<Vec<f32>, SecAggError> {
        let (survivors, dropped) = self.roster()?;
        if replies.len() < self.params.threshold {
            return Err(SecAggError::BelowThreshold {
                survivors: replies.len(),
                threshold: self.params.threshold,
            });
        }
        let mut sum = vec![0u32; self.params.dim];
        for y in self.masked.values() {
            for (s, v) in sum.iter_mut().zip(y) {
                *s = s.wrapping_add(*v);
            }
        }
        let collect = |owner: usize, pick: fn(&UnmaskReply) -> &Vec<(usize, Scalar)>| {
            let shares: Vec<(Scalar, Scalar)> = replies
                .iter()
                .filter_map(|r| {
                    pick(r)
                        .iter()
                        .find(|(o, _)| *o == owner)
                        .map(|(_, y)| (Scalar::from(r.from as u64), *y))
                })
                .take(self.params.threshold)
                .collect();
            if shares.len() < self.params.threshold {
                return Err(SecAggError::BelowThreshold {
                    survivors: shares.len(),
                    threshold: self.params.threshold,
                });
            }
            Ok(shamir_combine(&shares))
        };
        for &i in &survivors {
            let seed = collect(i, |r| &r.self_mask)?;
            add_stream(&mut sum, &seed_bytes(b"self", &seed), -1);
        }
        for &d in &dropped {
            let secret = secret_from_scalar(&collect(d, |r| &r.mask_secret)?);
            for &j in &survivors {
                let advert = self.adverts.get(&j).ok_or(SecAggError::UnknownParty(j))?;
                // Survivor j added sign(j, d) times this stream; take it out.
                let seed = pairwise_seed(&secret, &advert.mask_key);
                let sign = if j < d { -1 } else { 1 };
                add_stream(&mut sum, &seed, sign);
            }
        }
        Ok(self.params.decode(&sum))
    }
}

fn nonce(from: usize, to: usize) -> Nonce {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&(from as u32).to_le_bytes());
    n[4..8].copy_from_slice(&(to as u32).to_le_bytes());
    *Nonce::from_slice(&n)
}

fn aad(from: usize, to: usize) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..8].copy_from_slice(&(from as u64).to_le_bytes());
    a[8..].copy_from_slice(&(to as u64).to_le_bytes());
    a
}

fn scalar_from(bytes: &[u8]) -> Option<Scalar> {
    let arr: [u8; 32] = bytes.try_into().ok()?;
    Option::from(Scalar::from_canonical_bytes(arr))
}

fn seed_bytes(label: &[u8], s: &Scalar) -> [u8; 32] {
    Sha256::new()
        .chain_update(b"baygrid-secagg-")
        .chain_update(label)
        .chain_update(s.as_bytes())
        .finalize()
        .into()
}

fn pairwise_seed(secret: &StaticSecret, peer: &[u8; 32]) -> [u8; 32] {
    let shared = secret.diffie_hellman(&PublicKey::from(*peer));
    Sha256::new()
        .chain_update(b"baygrid-secagg-pairwise")
        .chain_update(shared.as_bytes())
        .finalize()
        .into()
}

/// Add (`sign` = 1) or subtract (−1) the ChaCha20 stream of `seed`.
fn add_stream(v: &mut [u32], seed: &[u8; 32], sign: i32) {
    let mut rng = ChaCha20Rng::from_seed(*seed);
    for x in v.iter_mut() {
        let m = rng.next_u32();
        *x = if sign > 0 {
            x.wrapping_add(m)
        } else {
            x.wrapping_sub(m)
        };
    }
}

/// Shamir shares of `secret` at x = 1..=n, any `t` of which recover it.
pub fn shamir_split<R: RngCore + CryptoRng>(
    secret: &Scalar,
    n: usize,
    t: usize,
    rng: &mut R,
) -> Vec<Scalar> {
    let coeffs: Vec<Scalar> = std::iter::once(*secret)
        .chain((1..t).map(|_| Scalar::random(rng)))
        .collect();
    (1..=n as u64)
        .map(|x| {
            let x = Scalar::from(x);
            coeffs.iter().rev().fold(Scalar::ZERO, |acc, c| acc * x + c)
        })
        .collect()
}

/// Lagrange interpolation at zero of (x, y) shares.
pub fn shamir_combine(shares: &[(Scalar, Scalar)]) -> Scalar {
    let mut secret = Scalar::ZERO;
    for (i, (xi, yi)) in shares.iter().enumerate() {
        let mut num = Scalar::ONE;
        let mut den = Scalar::ONE;
        for (j, (xj, _)) in shares.iter().enumerate() {
            if i != j {
                num *= xj;
                den *= xj - xi;
            }
        }
        secret += yi * num * den.invert();
    }
    secret
}

/// Bytes and outcome of one in-process round, for tests and benchmarks.
#[derive(Debug, Clone)]
pub struct RoundReport {
    pub sum: Vec<f32>,
    pub survivors: Vec<usize>,
    pub dropped: Vec<usize>,
    /// Bytes every party sent and received in total, aggregator included.
    pub bytes: usize,
}

/// Run one full round among `updates.len()` parties in this process.
/// Parties listed in `drop_after_sharing` share their keys, then never send
/// a masked input.
pub fn run_round<R: RngCore + CryptoRng>(
    params: Params,
    updates: &[Vec<f32>],
    drop_after_sharing: &[usize],
    rng: &mut R,
) -> Result<RoundReport, SecAggError> {
    if updates.len() != params.parties {
        return Err(SecAggError::Protocol(format!(
            "{} updates for {} parties",
            updates.len(),
            params.parties
        )));
    }
    let mut bytes = 0;
    let mut agg = Aggregator::new(params);
    let mut clients = Vec::new();
    for i in 1..=params.parties {
        let (c, a) = Client::new(params, i, rng)?;
        bytes += a.wire_len() * params.parties; // up, then relayed to all
        agg.advert(a);
        clients.push(c);
    }
    let adverts = agg.adverts();
    let mut envelopes = Vec::new();
    for c in clients.iter_mut() {
        let sealed = c.share_keys(&adverts, rng)?;
        bytes += sealed.iter().map(|e| 2 * e.wire_len()).sum::<usize>();
        envelopes.extend(sealed);
    }
    for c in clients.iter_mut() {
        c.receive_shares(&envelopes)?;
    }
    agg.members(1..=params.parties)?;
    for (c, update) in clients.iter().zip(updates) {
        if drop_after_sharing.contains(&c.index()) {
            continue;
        }
        let y = c.masked_input(update)?;
        bytes += 4 * y.len();
        agg.masked_input(c.index(), y)?;
    }
    let (survivors, dropped) = agg.roster()?;
    let mut replies = Vec::new();
    for c in clients.iter().filter(|c| survivors.contains(&c.index())) {
        let reply = c.unmask(&survivors, &dropped)?;
        bytes += reply.wire_len() + 16;
        replies.push(reply);
    }
    let sum = agg.finish(&replies)?;
    bytes += 4 * sum.len() * survivors.len(); // the sum goes back to survivors
    Ok(RoundReport {
        sum,
        survivors,
        dropped,
        bytes,
    })
}

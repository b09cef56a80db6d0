//! Horizontal training with each party and the aggregator in its own place: the
//! messages they exchange, and the two roles' loops over any [`Transport`]. The
//! server's relay carries them between vaults' agents; the tests carry them over
//! channels. Every party runs [`run_party`] beside its own rows; the aggregator runs
//! [`run_aggregator`] and, with three or more parties, only ever receives masked
//! vectors (the round's loss travels inside the masked vector as its last element).
//! With two parties the sum would reveal the other's update, so the run is plain
//! FedAvg and says so.

use std::time::{Duration, Instant};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::data::Table;
use crate::homo::{self, Aggregation, HomoConfig, LocalParty, RoundStats, TrainError};
use crate::psi;
use crate::secagg::{self, Advert, Envelope, Params, UnmaskReply};

/// A psi run's party (1 the guest, 2 the host): ECDH PSI with the other through the
/// transport. Returns what this party learned (the intersection, in its own ids' order,
/// when `reveal` tells it) and the set sizes.
pub fn run_psi<T: Transport>(
    index: usize,
    ids: &[String],
    reveal: psi::Reveal,
    transport: &mut T,
    wait: Duration,
) -> Result<psi::PsiOutcome, FedError> {
    let (role, peer) = match index {
        1 => (psi::Role::Guest, 2),
        2 => (psi::Role::Host, 1),
        other => {
            return Err(FedError::Protocol(format!(
                "a psi run has parties 1 and 2, not {other}"
            )))
        }
    };
    Link::new(transport).psi(peer, role, ids, reveal, wait)
}

/// The aggregator's address; parties are 1..=n.
pub const AGGREGATOR: usize = 0;

#[derive(Debug, thiserror::Error)]
pub enum FedError {
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("secure aggregation: {0}")]
    SecAgg(#[from] secagg::SecAggError),
    #[error("transport: {0}")]
    Transport(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("aborted: {0}")]
    Aborted(String),
}

/// What moves between a party and the aggregator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Msg {
    /// Party → aggregator, once: how many rows it trains on and its columns.
    Hello {
        rows: usize,
        columns: Vec<String>,
    },
    /// Aggregator → parties: the global model a round starts from. `threshold` is set
    /// when the round is securely aggregated among `parties`.
    Global {
        round: usize,
        parties: usize,
        total: usize,
        threshold: Option<usize>,
        params: Vec<f32>,
    },
    /// Party → aggregator, plain rounds: the weighted update and weighted loss.
    Update {
        params: Vec<f32>,
        loss: f64,
    },
    /// Secure rounds: a party's public keys; all of them relayed back.
    Advert(Advert),
    Adverts(Vec<Advert>),
    /// Secure rounds: sealed shares, party → aggregator → their addressees.
    Envelopes(Vec<Envelope>),
    /// Secure rounds: the masked update (loss appended).
    Masked(Vec<u32>),
    /// Secure rounds: who sent a masked update and who dropped.
    Roster {
        survivors: Vec<usize>,
        dropped: Vec<usize>,
    },
    Unmask(UnmaskReply),
    /// Aggregator → parties: the trained model and every round's figures.
    Final {
        params: Vec<f32>,
        rounds: Vec<RoundStats>,
        aggregation: Aggregation,
    },
    /// Vertical runs: a stretch of the PSI byte stream between guest and host.
    Psi(Vec<u8>),
    /// Vertical runs, party → dealer: the aligned rows and the party's width.
    Shape {
        rows: usize,
        width: usize,
    },
    /// Vertical runs, dealer → a product's owner: the seed of its (R, c_A).
    Seed([u8; 32]),
    /// Vertical runs, dealer → the other party of a product: the seed of s, and c_B.
    Correlation {
        seed: [u8; 32],
        c: Vec<u64>,
    },
    /// Vertical runs, guest ↔ host: ring elements (a share, E, f, a product share).
    Ring(Vec<u64>),
    /// Vertical runs, host → guest, at the end: the host's partial scores, for scoring.
    Partial(Vec<f64>),
    /// Either way: the run stops, with the reason.
    Abort(String),
}

/// How a role reaches the others. `recv` waits up to `wait` and answers `None` when
/// nothing came.
pub trait Transport {
    fn send(&mut self, to: usize, msg: &Msg) -> Result<(), FedError>;
    /// Sends each message to its addressee (distinct addressees, so their order does not
    /// matter): a transport that can sends them at once.
    fn send_each(&mut self, messages: &[(usize, Msg)]) -> Result<(), FedError> {
        messages
            .iter()
            .try_for_each(|(to, msg)| self.send(*to, msg))
    }
    fn recv(&mut self, wait: Duration) -> Result<Option<(usize, Msg)>, FedError>;
    /// Bytes sent and received so far.
    fn bytes(&self) -> usize;
}

/// A transport with the messages that arrived ahead of their turn kept in order: the
/// aggregator waits for each party in turn, and another may answer first.
pub(crate) struct Link<'t, T: Transport> {
    transport: &'t mut T,
    early: std::collections::VecDeque<(usize, Msg)>,
}

impl<'t, T: Transport> Link<'t, T> {
    pub(crate) fn new(transport: &'t mut T) -> Self {
        Link {
            transport,
            early: Default::default(),
        }
    }

    pub(crate) fn send(&mut self, to: usize, msg: &Msg) -> Result<(), FedError> {
        self.transport.send(to, msg)
    }

    /// One message to each of `to`, made for each by `msg`, sent at once where the
    /// transport can.
    pub(crate) fn send_each(
        &mut self,
        to: &[usize],
        mut msg: impl FnMut(usize) -> Msg,
    ) -> Result<(), FedError> {
        let messages: Vec<(usize, Msg)> = to.iter().map(|&p| (p, msg(p))).collect();
        self.transport.send_each(&messages)
    }

    pub(crate) fn bytes(&self) -> usize {
        self.transport.bytes()
    }

    /// The next message from anyone.
    fn next(&mut self, wait: Duration) -> Result<Option<(usize, Msg)>, FedError> {
        match self.early.pop_front() {
            Some(m) => Ok(Some(m)),
            None => self.transport.recv(wait),
        }
    }

    /// The next message from `from`; an abort from anyone ends the wait.
    pub(crate) fn from(&mut self, from: usize, wait: Duration) -> Result<Msg, FedError> {
        self.until(from, Instant::now() + wait, wait)
    }

    /// The next message from `from` by `deadline`, the end of a phase of `wait` that
    /// began earlier: every member of a phase has the same deadline, so waiting for them
    /// in turn never stretches a phase past `wait`.
    pub(crate) fn until(
        &mut self,
        from: usize,
        deadline: Instant,
        wait: Duration,
    ) -> Result<Msg, FedError> {
        if let Some(at) = self.early.iter().position(|(who, _)| *who == from) {
            let (_, msg) = self.early.remove(at).expect("found");
            return Ok(msg);
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.transport.recv(left)? {
                Some((_, Msg::Abort(reason))) => return Err(FedError::Aborted(reason)),
                Some((who, msg)) if who == from => return Ok(msg),
                Some(other) => self.early.push_back(other),
                None => {
                    return Err(FedError::Protocol(format!(
                        "nothing from {} within {wait:?}",
                        name(from)
                    )))
                }
            }
        }
    }
}

impl<T: Transport> Link<'_, T> {
    /// ECDH PSI with `peer` over this link (both learn the intersection): the protocol's
    /// byte stream travels as `Psi` messages, pumped here while the protocol runs on its
    /// own threads. Other messages that arrive meanwhile keep their turn.
    pub(crate) fn psi(
        &mut self,
        peer: usize,
        role: psi::Role,
        ids: &[String],
        reveal: psi::Reveal,
        wait: Duration,
    ) -> Result<psi::PsiOutcome, FedError> {
        let (out_tx, out_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let (in_tx, in_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        // stretches that came before the pump started
        let mut kept = std::collections::VecDeque::new();
        for (from, msg) in self.early.drain(..) {
            match msg {
                Msg::Psi(bytes) if from == peer => {
                    let _ = in_tx.send(bytes);
                }
                other => kept.push_back((from, other)),
            }
        }
        self.early = kept;
        std::thread::scope(|scope| {
            let protocol = scope.spawn(move || {
                psi::run_party(
                    role,
                    ids,
                    reveal,
                    psi::DEFAULT_BATCH,
                    psi::ChunkReader::new(in_rx, wait),
                    psi::ChunkWriter(move |chunk| out_tx.send(chunk).is_ok()),
                    &mut rand::rngs::OsRng,
                )
            });
            loop {
                let finished = protocol.is_finished();
                for chunk in out_rx.try_iter() {
                    self.transport.send(peer, &Msg::Psi(chunk))?;
                }
                if finished {
                    break;
                }
                match self.transport.recv(Duration::from_millis(20))? {
                    Some((from, Msg::Psi(bytes))) if from == peer => {
                        let _ = in_tx.send(bytes);
                    }
                    Some((_, Msg::Abort(reason))) => return Err(FedError::Aborted(reason)),
                    Some(other) => self.early.push_back(other),
                    None => {}
                }
            }
            protocol
                .join()
                .map_err(|_| FedError::Protocol("the PSI thread panicked".into()))?
                .map_err(|e| FedError::Protocol(format!("PSI: {e}")))
        })
    }
}

fn name(role: usize) -> String {
    if role == AGGREGATOR {
        "the aggregator".into()
    } else {
        format!("party {role}")
    }
}

fn unexpected(what: &str, msg: &Msg) -> FedError {
    FedError::Protocol(format!("expected {what}, got {}", msg.kind()))
}

impl Msg {
    /// The message's name, for errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "a hello",
            Msg::Global { .. } => "a global model",
            Msg::Update { .. } => "a plain update",
            Msg::Advert(_) => "an advert",
            Msg::Adverts(_) => "the adverts",
            Msg::Envelopes(_) => "sealed shares",
            Msg::Masked(_) => "a masked update",
            Msg::Roster { .. } => "a roster",
            Msg::Unmask(_) => "an unmasking reply",
            Msg::Final { .. } => "the final model",
            Msg::Psi(_) => "a PSI stream stretch",
            Msg::Shape { .. } => "a shape",
            Msg::Seed(_) => "a correlation seed",
            Msg::Correlation { .. } => "a correlation",
            Msg::Ring(_) => "ring elements",
            Msg::Partial(_) => "partial scores",
            Msg::Abort(_) => "an abort",
        }
    }
}

/// What a party keeps: the final model, the rounds' figures, and its DP spend.
#[derive(Debug, Clone)]
pub struct PartyOutcome {
    pub params: Vec<f32>,
    pub rounds: Vec<RoundStats>,
    pub aggregation: Aggregation,
    pub epsilon: Option<f64>,
}

/// A party's loop: announce its rows, train every round from the global model, send its
/// update (masked when the round is secure), until the aggregator sends the final model.
pub fn run_party<T: Transport>(
    cfg: &HomoConfig,
    table: Table,
    index: usize,
    device: Device,
    transport: &mut T,
    wait: Duration,
) -> Result<PartyOutcome, FedError> {
    let mut link = Link::new(transport);
    let link = &mut link;
    // the aggregator may spend a whole `wait` on a silent party before it answers the
    // others, so a party gives it twice that
    let wait = patience(wait);
    let columns = table.columns.clone();
    let mut local = LocalParty::new(cfg.clone(), table, index, device);
    link.send(
        AGGREGATOR,
        &Msg::Hello {
            rows: local.rows(),
            columns,
        },
    )?;
    loop {
        match link.from(AGGREGATOR, wait)? {
            Msg::Global {
                round,
                parties,
                total,
                threshold,
                params,
            } => {
                let (update, loss) = local.step(&params, round, total)?;
                match threshold {
                    None => link.send(
                        AGGREGATOR,
                        &Msg::Update {
                            params: update,
                            loss,
                        },
                    )?,
                    Some(t) => {
                        let p = Params::new(parties, t, update.len() + 1)?;
                        secure_round(p, index, update, loss, link, wait)?
                    }
                }
            }
            Msg::Final {
                params,
                rounds,
                aggregation,
            } => {
                return Ok(PartyOutcome {
                    params,
                    rounds,
                    aggregation,
                    epsilon: local.epsilon(),
                })
            }
            other => return Err(unexpected("a global model", &other)),
        }
    }
}

/// How long a party waits for the aggregator, which itself waits up to `wait` for the
/// slowest party of a phase before it answers.
fn patience(wait: Duration) -> Duration {
    wait.saturating_mul(2)
}

fn secure_round<T: Transport>(
    params: Params,
    index: usize,
    mut update: Vec<f32>,
    loss: f64,
    link: &mut Link<'_, T>,
    wait: Duration,
) -> Result<(), FedError> {
    let rng = &mut rand::rngs::OsRng;
    let (mut client, advert) = secagg::Client::new(params, index, rng)?;
    link.send(AGGREGATOR, &Msg::Advert(advert))?;
    let adverts = match link.from(AGGREGATOR, wait)? {
        Msg::Adverts(a) => a,
        other => return Err(unexpected("the adverts", &other)),
    };
    let sealed = client.share_keys(&adverts, rng)?;
    link.send(AGGREGATOR, &Msg::Envelopes(sealed))?;
    match link.from(AGGREGATOR, wait)? {
        Msg::Envelopes(mine) => client.receive_shares(&mine)?,
        other => return Err(unexpected("the shares sealed for this party", &other)),
    }
    update.push(loss as f32);
    link.send(AGGREGATOR, &Msg::Masked(client.masked_input(&update)?))?;
    let (survivors, dropped) = match link.from(AGGREGATOR, wait)? {
        Msg::Roster { survivors, dropped } => (survivors, dropped),
        other => return Err(unexpected("the roster", &other)),
    };
    let reply = client.unmask(&survivors, &dropped)?;
    link.send(AGGREGATOR, &Msg::Unmask(reply))
}

/// What the aggregator ends with.
#[derive(Debug, Clone)]
pub struct AggregatorOutcome {
    pub params: Vec<f32>,
    pub rounds: Vec<RoundStats>,
    pub aggregation: Aggregation,
    /// Parties that dropped in a round and were left out of its sum.
    pub dropped: Vec<usize>,
}

/// The aggregator's loop over `parties` parties: the global model each round, the sum
/// of their weighted updates (through secure aggregation with three or more), the
/// final model to all. Each phase (hellos, updates, adverts, shares, masked inputs,
/// unmasking replies) waits up to `wait` from its start; a party silent that long fails
/// the run, except after sharing its keys in a secure round: then it is dropped from
/// that round as long as the threshold still holds.
pub fn run_aggregator<T: Transport>(
    cfg: &HomoConfig,
    parties: usize,
    transport: &mut T,
    wait: Duration,
    progress: impl FnMut(&RoundStats),
) -> Result<AggregatorOutcome, FedError> {
    let mut link = Link::new(transport);
    let outcome = aggregate(cfg, parties, &mut link, wait, progress);
    if let Err(e) = &outcome {
        // the parties stop at once instead of waiting out their own timeouts
        for p in 1..=parties {
            let _ = link.send(p, &Msg::Abort(e.to_string()));
        }
    }
    outcome
}

fn aggregate<T: Transport>(
    cfg: &HomoConfig,
    parties: usize,
    link: &mut Link<'_, T>,
    wait: Duration,
    mut progress: impl FnMut(&RoundStats),
) -> Result<AggregatorOutcome, FedError> {
    if parties < 2 {
        return Err(FedError::Protocol(format!(
            "a run needs two parties or more, not {parties}"
        )));
    }
    if cfg.rounds == 0 {
        return Err(TrainError::Config("rounds: must be at least 1".into()).into());
    }
    // rows per party, indexed from 1
    let mut rows_of = vec![0usize];
    let mut columns: Option<Vec<String>> = None;
    let deadline = Instant::now() + wait;
    for p in 1..=parties {
        match link.until(p, deadline, wait)? {
            Msg::Hello { rows, columns: c } => {
                if rows == 0 {
                    return Err(FedError::Protocol(format!("party {p} has no rows")));
                }
                match &columns {
                    Some(first) if *first != c => {
                        return Err(FedError::Protocol(format!(
                            "party {p} has columns {c:?}, party 1 has {first:?}"
                        )))
                    }
                    _ => columns = Some(c),
                }
                rows_of.push(rows);
            }
            other => return Err(unexpected("a hello", &other)),
        }
    }
    let d = columns.map(|c| c.len()).unwrap_or(0);
    let threshold =
        (parties >= 3 && !cfg.plain).then(|| cfg.secure_threshold.unwrap_or(parties / 2 + 1));
    let dim = homo::dim(cfg.arch, d);
    let params = threshold
        .map(|t| Params::new(parties, t, dim + 1))
        .transpose()?;
    let aggregation = match params {
        Some(p) => Aggregation::Secure {
            threshold: p.threshold,
        },
        None => Aggregation::Plain,
    };
    let mut global = homo::initial_params(cfg.arch, d, cfg.seed);
    let mut rounds = Vec::new();
    // a party that drops out of a secure round is left out of the rest of the run
    let mut active: Vec<usize> = (1..=parties).collect();
    let mut dropped_ever = Vec::new();
    for round in 0..cfg.rounds {
        let start = Instant::now();
        let bytes_before = link.bytes();
        let total: usize = active.iter().map(|&p| rows_of[p]).sum();
        link.send_each(&active, |_| Msg::Global {
            round,
            parties,
            total,
            threshold,
            params: global.clone(),
        })?;
        let agg_start;
        let (sum, loss) = match params {
            None => {
                let mut sum = vec![0.0f32; dim];
                let mut loss = 0.0;
                let mut updates = Vec::new();
                let deadline = Instant::now() + wait;
                for p in 1..=parties {
                    match link.until(p, deadline, wait)? {
                        Msg::Update { params, loss } => updates.push((params, loss)),
                        other => return Err(unexpected("an update", &other)),
                    }
                }
                agg_start = Instant::now();
                for (u, l) in updates {
                    if u.len() != dim {
                        return Err(FedError::Protocol(format!(
                            "an update of {} parameters for a model of {dim}",
                            u.len()
                        )));
                    }
                    for (s, v) in sum.iter_mut().zip(&u) {
                        *s += v;
                    }
                    loss += l;
                }
                (sum, loss)
            }
            Some(p) => {
                let (mut sum, dropped) = secure_sum(p, &active, link, wait)?;
                agg_start = Instant::now();
                active.retain(|p| !dropped.contains(p));
                dropped_ever.extend(dropped);
                // the survivors' weights were shares of every active party's rows
                let kept: usize = active.iter().map(|&p| rows_of[p]).sum();
                let scale = total as f32 / kept as f32;
                sum.iter_mut().for_each(|v| *v *= scale);
                let loss = sum.pop().unwrap_or(0.0) as f64;
                (sum, loss)
            }
        };
        let aggregation_seconds = agg_start.elapsed().as_secs_f64();
        global = sum;
        let stats = RoundStats {
            round: round + 1,
            loss,
            seconds: start.elapsed().as_secs_f64(),
            bytes: link.bytes() - bytes_before,
            aggregation_seconds,
        };
        progress(&stats);
        rounds.push(stats);
    }
    link.send_each(&active, |_| Msg::Final {
        params: global.clone(),
        rounds: rounds.clone(),
        aggregation,
    })?;
    dropped_ever.sort_unstable();
    dropped_ever.dedup();
    Ok(AggregatorOutcome {
        params: global,
        rounds,
        aggregation,
        dropped: dropped_ever,
    })
}

/// One securely aggregated round, as the aggregator: the sum of the survivors' vectors
/// (loss last) and the parties that dropped after sharing their keys.
fn secure_sum<T: Transport>(
    params: Params,
    members: &[usize],
    link: &mut Link<'_, T>,
    wait: Duration,
) -> Result<(Vec<f32>, Vec<usize>), FedError> {
    let n = members.len();
    let mut agg = secagg::Aggregator::new(params);
    agg.members(members.iter().copied())?;
    let deadline = Instant::now() + wait;
    for &p in members {
        match link.until(p, deadline, wait)? {
            Msg::Advert(a) if a.party == p => agg.advert(a),
            other => return Err(unexpected("the party's own advert", &other)),
        }
    }
    let adverts = agg.adverts();
    link.send_each(members, |_| Msg::Adverts(adverts.clone()))?;
    let mut sealed: Vec<Envelope> = Vec::new();
    let deadline = Instant::now() + wait;
    for &p in members {
        match link.until(p, deadline, wait)? {
            Msg::Envelopes(e) if e.iter().all(|e| e.from == p) => sealed.extend(e),
            other => return Err(unexpected("the party's sealed shares", &other)),
        }
    }
    link.send_each(members, |p| {
        Msg::Envelopes(sealed.iter().filter(|e| e.to == p).cloned().collect())
    })?;
    // masked inputs: whoever is silent past the wait drops out of this round
    let deadline = Instant::now() + wait;
    let mut got = std::collections::BTreeSet::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match link.next(left)? {
            None => break,
            Some((_, Msg::Abort(reason))) => return Err(FedError::Aborted(reason)),
            Some((p, Msg::Masked(y))) if members.contains(&p) => {
                agg.masked_input(p, y)?;
                got.insert(p);
            }
            Some((p, other)) => {
                return Err(unexpected(
                    &format!("a masked update from party {p}"),
                    &other,
                ))
            }
        }
    }
    let (survivors, dropped) = agg.roster()?;
    link.send_each(&survivors, |_| Msg::Roster {
        survivors: survivors.clone(),
        dropped: dropped.clone(),
    })?;
    let mut replies = Vec::new();
    let deadline = Instant::now() + wait;
    for &p in &survivors {
        match link.until(p, deadline, wait)? {
            Msg::Unmask(r) if r.from == p => replies.push(r),
            other => return Err(unexpected("an unmasking reply", &other)),
        }
    }
    Ok((agg.finish(&replies)?, dropped))
}

#[cfg(test)]
mod tests;

//! ECDH private set intersection over ristretto255.
//!
//! Each party hashes its ids into the group and blinds them with a secret
//! scalar. The blinded points are exchanged in streamed batches; each side
//! blinds the other's points a second time. Because scalar multiplication
//! commutes, an id held by both parties ends as the same double-blinded point
//! on both sides, and nothing else about the other side's ids is learned
//! beyond its set size.
//!
//! Who learns the intersection is a setting ([`Reveal`]): with
//! [`Reveal::Both`] each party returns the other's double-blinded points; with
//! [`Reveal::Designated`] only the designated party gets them back, so the
//! other learns nothing but the designated party's set size.
//!
//! The wire format is a sequence of frames, `kind: u8`, `count: u32` (LE),
//! then `count` 32-byte compressed points (or, for `HELLO`, one u64 set size
//! and one reveal byte). Reading and writing run on their own threads, so
//! a party can blind its own ids while it answers the peer's batches.

use std::collections::{HashMap, HashSet};
use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::mpsc;

use curve25519_dalek::ristretto::{CompressedRistretto, RistrettoPoint};
use curve25519_dalek::scalar::Scalar;
use rand::seq::SliceRandom;
use rand::{CryptoRng, RngCore};
use sha2::Sha512;

/// Points per streamed batch.
pub const DEFAULT_BATCH: usize = 4096;
const DOMAIN: &[u8] = b"baygrid-psi-v1/ristretto255/sha512:";

const FRAME_HELLO: u8 = 1;
const FRAME_OWN: u8 = 2;
const FRAME_OWN_END: u8 = 3;
const FRAME_ECHO: u8 = 4;
const FRAME_ECHO_END: u8 = 5;
/// A peer silent for this long fails the run rather than hanging it.
pub const IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
/// Largest batch a peer may announce; bounds what one frame can allocate.
const MAX_FRAME_POINTS: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PsiError {
    #[error("psi transport: {0}")]
    Io(#[from] std::io::Error),
    #[error("psi peer sent an invalid group element at position {index} of its {stream} stream")]
    InvalidPoint { stream: &'static str, index: usize },
    #[error("psi protocol violation: {0}")]
    Protocol(String),
    #[error("psi settings disagree: this party expects {ours:?}, the peer {theirs:?}")]
    RevealMismatch { ours: Reveal, theirs: Reveal },
}

/// Which side of the exchange a party plays. The guest is the party that
/// learns the intersection under [`Reveal::Designated`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Guest,
    Host,
}

/// A psi run's settings through the exchange: who learns the intersection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PsiSettings {
    pub reveal: Reveal,
}

impl Default for PsiSettings {
    fn default() -> Self {
        PsiSettings {
            reveal: Reveal::Both,
        }
    }
}

/// Who learns the intersection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reveal {
    /// Both parties learn it.
    Both,
    /// Only the guest learns it; the host learns the guest's set size.
    Designated,
}

impl Reveal {
    fn byte(self) -> u8 {
        match self {
            Reveal::Both => 0,
            Reveal::Designated => 1,
        }
    }
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Reveal::Both),
            1 => Some(Reveal::Designated),
            _ => None,
        }
    }
    /// Whether the party in `role` receives its double-blinded points back.
    fn learns(self, role: Role) -> bool {
        self == Reveal::Both || role == Role::Guest
    }
}

/// A party's secret blinding key, fresh for every run. The key is 2·h for the random
/// scalar h held here: points are multiplied by h and then doubled while being compressed,
/// which compresses a whole batch with one field inversion instead of one inverse square
/// root per point.
pub struct PsiKey(Scalar);

impl PsiKey {
    pub fn random<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        loop {
            let s = Scalar::random(rng);
            if s != Scalar::ZERO {
                return PsiKey(s);
            }
        }
    }

    /// Hash each id into the group and blind it.
    pub fn blind<I: AsRef<[u8]>>(&self, ids: &[I]) -> Vec<[u8; 32]> {
        let points: Vec<RistrettoPoint> = ids
            .iter()
            .map(|id| hash_to_group(id.as_ref()) * self.0)
            .collect();
        RistrettoPoint::double_and_compress_batch(&points)
            .into_iter()
            .map(|c| c.to_bytes())
            .collect()
    }

    /// Blind the peer's points a second time. `stream` names them in errors.
    pub fn reblind(
        &self,
        points: &[[u8; 32]],
        offset: usize,
        stream: &'static str,
    ) -> Result<Vec<[u8; 32]>, PsiError> {
        let blinded = points
            .iter()
            .enumerate()
            .map(|(i, p)| {
                CompressedRistretto(*p)
                    .decompress()
                    .map(|point| point * self.0)
                    .ok_or(PsiError::InvalidPoint {
                        stream,
                        index: offset + i,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RistrettoPoint::double_and_compress_batch(&blinded)
            .into_iter()
            .map(|c| c.to_bytes())
            .collect())
    }
}

/// Map an id to a uniformly distributed group element (domain-separated).
pub fn hash_to_group(id: &[u8]) -> RistrettoPoint {
    let mut input = Vec::with_capacity(DOMAIN.len() + id.len());
    input.extend_from_slice(DOMAIN);
    input.extend_from_slice(id);
    RistrettoPoint::hash_from_bytes::<Sha512>(&input)
}

/// What a party learns from one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PsiOutcome {
    /// The intersection, in this party's input order (first occurrence of
    /// each id); `None` when this party is not told it.
    pub intersection: Option<Vec<String>>,
    /// Distinct ids this party brought.
    pub own_size: usize,
    /// Distinct ids the peer brought.
    pub peer_size: usize,
    /// Bytes this party wrote to the peer.
    pub bytes_sent: u64,
    /// Bytes this party read from the peer.
    pub bytes_received: u64,
}

/// Run one party of the protocol over a byte stream to the peer.
///
/// `ids` may hold duplicates; each distinct id is blinded once. Both parties
/// must agree on `reveal`, which the first frame checks.
pub fn run_party<R, W, G>(
    role: Role,
    ids: &[String],
    reveal: Reveal,
    batch: usize,
    reader: R,
    writer: W,
    rng: &mut G,
) -> Result<PsiOutcome, PsiError>
where
    R: Read + Send,
    W: Write + Send,
    G: RngCore + CryptoRng,
{
    let batch = batch.clamp(1, MAX_FRAME_POINTS as usize);
    let key = PsiKey::random(rng);
    // Distinct ids, first occurrence order kept for the answer; the order
    // sent is shuffled so that positions say nothing about the ids.
    let mut seen = HashSet::with_capacity(ids.len());
    let distinct: Vec<&str> = ids
        .iter()
        .map(String::as_str)
        .filter(|id| seen.insert(*id))
        .collect();
    let mut order: Vec<usize> = (0..distinct.len()).collect();
    order.shuffle(rng);

    let i_learn = reveal.learns(role);
    let peer_learns = reveal.learns(match role {
        Role::Guest => Role::Host,
        Role::Host => Role::Guest,
    });

    let (tx, rx) = mpsc::sync_channel::<Frame>(8);
    std::thread::scope(|scope| -> Result<PsiOutcome, PsiError> {
        // Writer: the only owner of the outgoing stream.
        let writer_thread = scope.spawn(move || -> Result<u64, PsiError> {
            let mut out = BufWriter::with_capacity(1 << 16, writer);
            let mut sent = 0u64;
            for frame in rx {
                sent += frame.write(&mut out)?;
                if frame.kind == FRAME_ECHO_END || frame.kind == FRAME_OWN_END {
                    out.flush()?;
                }
            }
            out.flush()?;
            Ok(sent)
        });

        // Own ids: blind in batches and stream them.
        let own_tx = tx.clone();
        let key_ref = &key;
        let distinct_ref = &distinct;
        let order_ref = &order;
        let blinder = scope.spawn(move || -> Result<(), PsiError> {
            let _ = own_tx.send(Frame::hello(distinct_ref.len() as u64, reveal));
            for chunk in order_ref.chunks(batch) {
                let ids: Vec<&[u8]> = chunk.iter().map(|&i| distinct_ref[i].as_bytes()).collect();
                let points = key_ref.blind(&ids);
                if own_tx.send(Frame::points(FRAME_OWN, points)).is_err() {
                    return Ok(()); // writer gone; its error is reported
                }
            }
            let _ = own_tx.send(Frame::points(FRAME_OWN_END, Vec::new()));
            Ok(())
        });

        // Reader: answer the peer's batches, keep what comes back.
        let mut input = BufReader::with_capacity(1 << 16, reader);
        let mut received = 0u64;
        let mut peer_size = None;
        let mut peer_double: HashSet<[u8; 32]> = HashSet::new();
        let mut peer_seen = 0usize;
        let mut own_double: Vec<[u8; 32]> = Vec::new();
        let (mut peer_own_done, mut echo_done) = (false, !i_learn);
        while !(peer_own_done && echo_done) {
            let frame = Frame::read(&mut input)?;
            received += frame.wire_len();
            match frame.kind {
                FRAME_HELLO => {
                    let (size, theirs) = frame.hello_fields()?;
                    if theirs != reveal {
                        return Err(PsiError::RevealMismatch {
                            ours: reveal,
                            theirs,
                        });
                    }
                    peer_size = Some(size as usize);
                    if i_learn {
                        peer_double.reserve(size.min(1 << 26) as usize);
                    }
                }
                FRAME_OWN if peer_size.is_some() && !peer_own_done => {
                    let doubled = key.reblind(&frame.points, peer_seen, "blinded-ids")?;
                    peer_seen += frame.points.len();
                    if i_learn {
                        peer_double.extend(doubled.iter().copied());
                    }
                    if peer_learns && tx.send(Frame::points(FRAME_ECHO, doubled)).is_err() {
                        break;
                    }
                }
                FRAME_OWN_END if !peer_own_done => {
                    if Some(peer_seen) != peer_size {
                        return Err(PsiError::Protocol(format!(
                            "peer announced {} ids but sent {peer_seen}",
                            peer_size.unwrap_or(0)
                        )));
                    }
                    peer_own_done = true;
                    if peer_learns {
                        let _ = tx.send(Frame::points(FRAME_ECHO_END, Vec::new()));
                    }
                }
                FRAME_ECHO if i_learn && !echo_done => {
                    own_double.extend_from_slice(&frame.points);
                }
                FRAME_ECHO_END if i_learn && !echo_done => echo_done = true,
                kind => {
                    return Err(PsiError::Protocol(format!(
                        "unexpected frame kind {kind} (peer announced: {}, peer ids done: {peer_own_done}, echo done: {echo_done})",
                        peer_size.is_some()
                    )))
                }
            }
        }
        drop(tx);
        blinder.join().expect("blinder thread panicked")?;
        let sent = writer_thread.join().expect("writer thread panicked")?;

        let intersection = if i_learn {
            if own_double.len() != distinct.len() {
                return Err(PsiError::Protocol(format!(
                    "peer returned {} points for {} ids",
                    own_double.len(),
                    distinct.len()
                )));
            }
            let mut hit = vec![false; distinct.len()];
            for (pos, point) in own_double.iter().enumerate() {
                if peer_double.contains(point) {
                    hit[order[pos]] = true;
                }
            }
            Some(
                distinct
                    .iter()
                    .zip(hit)
                    .filter(|(_, h)| *h)
                    .map(|(id, _)| id.to_string())
                    .collect(),
            )
        } else {
            None
        };
        Ok(PsiOutcome {
            intersection,
            own_size: distinct.len(),
            peer_size: peer_size.unwrap_or(0),
            bytes_sent: sent,
            bytes_received: received,
        })
    })
}

/// Align two parties' rows on the intersection: for each id of
/// `intersection`, its row index in `ids` (first occurrence).
pub fn align(ids: &[String], intersection: &[String]) -> Vec<usize> {
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        index.entry(id.as_str()).or_insert(i);
    }
    intersection
        .iter()
        .filter_map(|id| index.get(id.as_str()).copied())
        .collect()
}

struct Frame {
    kind: u8,
    points: Vec<[u8; 32]>,
    hello: Option<(u64, u8)>,
}

impl Frame {
    fn hello(size: u64, reveal: Reveal) -> Self {
        Frame {
            kind: FRAME_HELLO,
            points: Vec::new(),
            hello: Some((size, reveal.byte())),
        }
    }
    fn points(kind: u8, points: Vec<[u8; 32]>) -> Self {
        Frame {
            kind,
            points,
            hello: None,
        }
    }
    fn wire_len(&self) -> u64 {
        5 + if self.kind == FRAME_HELLO {
            9
        } else {
            32 * self.points.len() as u64
        }
    }
    fn write<W: Write>(&self, out: &mut W) -> Result<u64, PsiError> {
        out.write_all(&[self.kind])?;
        if let Some((size, reveal)) = self.hello {
            out.write_all(&1u32.to_le_bytes())?;
            out.write_all(&size.to_le_bytes())?;
            out.write_all(&[reveal])?;
        } else {
            out.write_all(&(self.points.len() as u32).to_le_bytes())?;
            for p in &self.points {
                out.write_all(p)?;
            }
        }
        Ok(self.wire_len())
    }
    fn read<R: Read>(input: &mut R) -> Result<Self, PsiError> {
        let mut head = [0u8; 5];
        input.read_exact(&mut head)?;
        let kind = head[0];
        let count = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
        if kind == FRAME_HELLO {
            let mut body = [0u8; 9];
            input.read_exact(&mut body)?;
            let size = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
            return Ok(Frame {
                kind,
                points: Vec::new(),
                hello: Some((size, body[8])),
            });
        }
        if count > MAX_FRAME_POINTS {
            return Err(PsiError::Protocol(format!(
                "frame of {count} points exceeds the limit of {MAX_FRAME_POINTS}"
            )));
        }
        let mut points = vec![[0u8; 32]; count as usize];
        for p in points.iter_mut() {
            input.read_exact(p)?;
        }
        Ok(Frame::points(kind, points))
    }
    fn hello_fields(&self) -> Result<(u64, Reveal), PsiError> {
        let (size, byte) = self
            .hello
            .ok_or_else(|| PsiError::Protocol("hello frame without body".into()))?;
        let reveal = Reveal::from_byte(byte)
            .ok_or_else(|| PsiError::Protocol(format!("unknown reveal setting {byte}")))?;
        Ok((size, reveal))
    }
}

/// Run both parties on this machine over a loopback TCP connection; returns
/// (guest outcome, host outcome). Used by tests and `baygrid bench psi`.
pub fn run_loopback(
    guest_ids: &[String],
    host_ids: &[String],
    reveal: Reveal,
    batch: usize,
) -> Result<(PsiOutcome, PsiOutcome), PsiError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::scope(|scope| {
        let host = scope.spawn(move || -> Result<PsiOutcome, PsiError> {
            let (stream, _) = listener.accept()?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(IO_TIMEOUT))?;
            stream.set_write_timeout(Some(IO_TIMEOUT))?;
            let reader = stream.try_clone()?;
            run_party(
                Role::Host,
                host_ids,
                reveal,
                batch,
                reader,
                stream,
                &mut rand::rngs::OsRng,
            )
        });
        let stream = std::net::TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let reader = stream.try_clone()?;
        let guest = run_party(
            Role::Guest,
            guest_ids,
            reveal,
            batch,
            reader,
            stream,
            &mut rand::rngs::OsRng,
        );
        let host = host.join().expect("host thread panicked");
        Ok((guest?, host?))
    })
}

/// Seconds per point of each step a party takes per id, over `n` ids: hashing into the
/// group, variable-base multiplication, compression (one at a time and in a batch), and
/// decompression. For `baygrid bench psi --ops`.
pub fn step_costs(n: usize) -> Vec<(&'static str, f64)> {
    use std::time::Instant;
    let ids: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    let key = PsiKey::random(&mut rand::rngs::OsRng);
    let per = |t: Instant| t.elapsed().as_secs_f64() / n as f64;

    let t = Instant::now();
    let points: Vec<RistrettoPoint> = ids.iter().map(|i| hash_to_group(i.as_bytes())).collect();
    let hash = per(t);
    let t = Instant::now();
    let blinded: Vec<RistrettoPoint> = points.iter().map(|p| p * key.0).collect();
    let mul = per(t);
    let t = Instant::now();
    let single: Vec<CompressedRistretto> = blinded.iter().map(|p| p.compress()).collect();
    let compress = per(t);
    let t = Instant::now();
    let batch = RistrettoPoint::double_and_compress_batch(&blinded);
    let compress_batch = per(t);
    let t = Instant::now();
    let back = single.iter().filter_map(|c| c.decompress()).count();
    let decompress = per(t);
    assert_eq!((back, batch.len()), (n, n));
    vec![
        ("hash to group", hash),
        ("scalar multiplication", mul),
        ("compress, one at a time", compress),
        ("double-and-compress, batched", compress_batch),
        ("decompress", decompress),
    ]
}

/// The peer's byte stream when it arrives in stretches (messages through a relay): the
/// stretches read in order; silence for `wait` is a timeout, a closed channel the end.
pub struct ChunkReader {
    from: mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    at: usize,
    wait: std::time::Duration,
}

impl ChunkReader {
    pub fn new(from: mpsc::Receiver<Vec<u8>>, wait: std::time::Duration) -> Self {
        ChunkReader {
            from,
            chunk: Vec::new(),
            at: 0,
            wait,
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at >= self.chunk.len() {
            match self.from.recv_timeout(self.wait) {
                Ok(chunk) => {
                    self.chunk = chunk;
                    self.at = 0;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the other party went silent",
                    ))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(0),
            }
        }
        let n = out.len().min(self.chunk.len() - self.at);
        out[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Bytes for the peer, each write handed on as one stretch; the function says whether
/// the stretch was taken (false: the link is closed).
pub struct ChunkWriter<F>(pub F);

impl<F: FnMut(Vec<u8>) -> bool> Write for ChunkWriter<F> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if !(self.0)(bytes.to_vec()) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "link closed",
            ));
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

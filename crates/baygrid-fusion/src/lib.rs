//! Sample-data fusion training (样本数据融合训练): the parties' raw rows stay
//! with them; only blinded ids, masked updates and secret shares move.
//!
//! - [`psi`]: ECDH private set intersection over ristretto255.
//! - [`data`]: party tables read from CSV.

pub mod data;
pub mod dp;
pub mod fed;
pub mod hetero;
pub mod homo;
pub mod metrics;
pub mod psi;
pub mod secagg;

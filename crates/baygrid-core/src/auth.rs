//! Who may do what: the roles a bearer token carries.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Runs the exchange: tenants, parties, tokens, the catalog.
    Operator,
    /// Publishes clusters and offers; subject is the provider's name.
    Provider,
    /// Submits jobs; subject is the tenant's name.
    Tenant,
    /// Holds datasets; subject is the party's name.
    DataHolder,
    /// Reads decisions and verifies the log.
    Regulator,
    /// An agent beside one cluster; subject is the cluster's name.
    Agent,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::Operator,
        Role::Provider,
        Role::Tenant,
        Role::DataHolder,
        Role::Regulator,
        Role::Agent,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Provider => "provider",
            Role::Tenant => "tenant",
            Role::DataHolder => "data_holder",
            Role::Regulator => "regulator",
            Role::Agent => "agent",
        }
    }

    /// Whether tokens of this role name a subject (a tenant, provider, party or cluster).
    pub fn needs_subject(self) -> bool {
        !matches!(self, Role::Operator | Role::Regulator)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!("unknown role `{s}`: expected operator, provider, tenant, data_holder, regulator or agent")
            })
    }
}

/// The caller behind a valid token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub token_id: String,
    pub role: Role,
    pub subject: Option<String>,
}

impl Principal {
    /// Whether this caller acts as `subject` in `role`.
    pub fn is(&self, role: Role, subject: &str) -> bool {
        self.role == role && self.subject.as_deref() == Some(subject)
    }
}

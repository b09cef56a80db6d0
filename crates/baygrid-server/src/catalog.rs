//! The catalog: published compute and the parties behind it. Cached in memory as a
//! snapshot, reloaded after every change (the server is the only writer).

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use baygrid_api::{ClusterView, IssueTokenRequest, IssuedToken, TenantView, TokenView};
use baygrid_core::catalog::{check_cluster, RoundTrips, TransferPrices};
use baygrid_core::{
    millis_to_rfc3339, AcceleratorModel, Catalog, Cluster, ExchangeRates, Money, Offer, Party,
    Principal, Provider, Role, Site, Tenant,
};
use baygrid_sched::{ClusterState, Market};
use baygrid_store::Store;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::auth::{actor, require};
use crate::body::JsonBody;
use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// Region-wide facts: rates, transfer prices, round trips.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Region {
    pub exchange_rates: ExchangeRates,
    pub transfer_price_per_gb: TransferPrices,
    pub round_trip_ms: Vec<(String, String, u32)>,
}

/// The catalog as loaded from the store.
#[derive(Debug, Clone, Default)]
pub struct CatalogSnapshot {
    pub accelerators: BTreeMap<String, AcceleratorModel>,
    pub parties: BTreeMap<String, Party>,
    pub providers: BTreeMap<String, Provider>,
    pub sites: BTreeMap<String, Site>,
    pub clusters: BTreeMap<String, Cluster>,
    pub offers: BTreeMap<String, Offer>,
    pub tenants: BTreeMap<String, Tenant>,
    /// Evidence of legal bases for data flows, by id.
    pub evidence: BTreeMap<String, baygrid_api::EvidenceRecord>,
    /// Datasets registered in the data zone, by name.
    pub datasets: BTreeMap<String, baygrid_api::DatasetSpec>,
    /// Data offers, by name.
    pub data_offers: BTreeMap<String, baygrid_api::DataOfferSpec>,
    /// Copies of datasets between vaults, by id.
    pub flows: BTreeMap<String, baygrid_api::FlowView>,
    /// Contracts on data offers, by id.
    pub contracts: BTreeMap<String, baygrid_api::ContractView>,
    /// Each dataset's recorded versions, oldest first.
    pub versions: BTreeMap<String, Vec<baygrid_api::DatasetVersion>>,
    pub rates: ExchangeRates,
    pub round_trips: RoundTrips,
    /// The region's price per GB for staging inputs; none before a sites file is published.
    pub transfer_price_per_gb: Option<TransferPrices>,
    /// Every cluster empty and online: what "could ever hold" is judged on.
    pub empty: Market,
}

async fn load_kind<T: DeserializeOwned>(
    store: &Store,
    kind: &str,
) -> Result<BTreeMap<String, T>, ApiError> {
    let mut out = BTreeMap::new();
    for (name, _, body) in store.list_catalog(kind).await? {
        let value: T = serde_json::from_value(body).map_err(|e| {
            ApiError::Unavailable(format!("stored {kind} `{name}` is unreadable: {e}"))
        })?;
        out.insert(name, value);
    }
    Ok(out)
}

impl CatalogSnapshot {
    /// The individuals the rules count for `dataset`: declared, or counted in its latest
    /// version's files where that is more.
    pub fn subjects_of(&self, dataset: &baygrid_api::DatasetSpec) -> u64 {
        dataset.subjects_in(
            self.versions
                .get(&dataset.name)
                .map(Vec::as_slice)
                .unwrap_or_default(),
        )
    }

    pub async fn load(store: &Store) -> Result<CatalogSnapshot, ApiError> {
        let regions: BTreeMap<String, Region> = load_kind(store, "region").await?;
        let transfer_price_per_gb = regions
            .get("default")
            .map(|r| r.transfer_price_per_gb.clone());
        let (rates, round_trips) = match regions.get("default") {
            Some(region) => {
                let catalog_like = Catalog {
                    version: 1,
                    exchange_rates: region.exchange_rates.clone(),
                    transfer_price_per_gb: region.transfer_price_per_gb.clone(),
                    accelerators: vec![],
                    parties: vec![],
                    providers: vec![],
                    sites: vec![],
                    clusters: vec![],
                    offers: vec![],
                    round_trip_ms: region.round_trip_ms.clone(),
                };
                (region.exchange_rates.clone(), catalog_like.round_trips())
            }
            None => (ExchangeRates::default(), RoundTrips::default()),
        };
        let mut snapshot = CatalogSnapshot {
            accelerators: load_kind(store, "accelerator").await?,
            parties: load_kind(store, "party").await?,
            providers: load_kind(store, "provider").await?,
            sites: load_kind(store, "site").await?,
            clusters: load_kind(store, "cluster").await?,
            offers: load_kind(store, "offer").await?,
            tenants: load_kind(store, "tenant").await?,
            evidence: load_kind(store, "evidence").await?,
            datasets: load_kind(store, "dataset").await?,
            data_offers: load_kind(store, "data_offer").await?,
            contracts: load_kind(store, "contract").await?,
            flows: load_kind(store, "flow").await?,
            versions: {
                let all: BTreeMap<String, baygrid_api::DatasetVersion> =
                    load_kind(store, "dataset_version").await?;
                let mut by_dataset: BTreeMap<String, Vec<baygrid_api::DatasetVersion>> =
                    BTreeMap::new();
                for version in all.into_values() {
                    by_dataset
                        .entry(version.dataset.clone())
                        .or_default()
                        .push(version);
                }
                for versions in by_dataset.values_mut() {
                    versions.sort_by_key(|v| v.version);
                }
                by_dataset
            },
            rates,
            round_trips,
            transfer_price_per_gb,
            empty: Market::default(),
        };
        snapshot.empty = snapshot.empty_market();
        Ok(snapshot)
    }

    /// The market with every cluster empty and online: what "could ever hold" is judged on.
    pub fn empty_market(&self) -> Market {
        let clusters = self
            .clusters
            .values()
            .filter_map(|c| self.cluster_state(c, true))
            .collect();
        Market {
            clusters,
            rates: self.rates.clone(),
            round_trips: self.round_trips.clone(),
            reference_tflops: Market::reference_tflops(self.accelerators.values()),
            transfer_price_per_gb: self.transfer_price_per_gb.clone(),
            // "could ever hold" does not depend on cost; the live market carries the weight
            green_weight: 0.0,
        }
    }

    pub fn cluster_state(&self, cluster: &Cluster, online: bool) -> Option<ClusterState> {
        let site = self.sites.get(&cluster.site)?.clone();
        Some(ClusterState::empty(
            cluster.clone(),
            site,
            self.offers.get(&cluster.name).cloned(),
            self.accelerators.get(&cluster.accelerator).cloned(),
            online,
        ))
    }

    /// The party a tenant acts as: the recipient of every flow to it.
    pub fn tenant_party(&self, tenant: &str) -> Option<&Party> {
        self.parties.get(&self.tenants.get(tenant)?.party)
    }

    /// The party holding a dataset: the exporter of every flow out of it.
    pub fn holder(&self, dataset: &baygrid_api::DatasetSpec) -> Result<&Party, ApiError> {
        self.parties.get(&dataset.holder).ok_or_else(|| {
            ApiError::Unavailable(format!(
                "dataset `{}` names holder `{}`, which is not a party",
                dataset.name, dataset.holder
            ))
        })
    }

    /// The tenant's location, which latency limits are measured from, and where the job's
    /// inputs are kept (what staging them elsewhere costs).
    pub fn requester(
        &self,
        tenant: &str,
        spec: &baygrid_core::JobSpec,
    ) -> Option<baygrid_sched::Requester> {
        let party = self.tenant_party(tenant)?;
        Some(baygrid_sched::Requester {
            city: party.city.clone(),
            jurisdiction: party.jurisdiction,
            blocked: Vec::new(),
            inputs_denied: Default::default(),
            inputs: self.input_sites(spec),
            over_quota: Default::default(),
        })
    }

    /// Each known input's vault site and the size of its latest version (what a job
    /// stages). Unknown inputs are left out: `inputs_denied` names them as errors.
    pub fn input_sites(&self, spec: &baygrid_core::JobSpec) -> Vec<baygrid_sched::InputSite> {
        spec.inputs
            .iter()
            .filter_map(|input| {
                let dataset = self.datasets.get(input)?;
                let site = self.sites.get(&dataset.vault)?;
                let bytes = self.versions.get(input)?.last()?.bytes;
                Some(baygrid_sched::InputSite {
                    dataset: input.clone(),
                    site: site.name.clone(),
                    city: site.city.clone(),
                    jurisdiction: site.jurisdiction,
                    bytes,
                })
            })
            .collect()
    }
}

/// Publishes a whole sites file: region facts, models, parties, providers, sites, clusters
/// and offers.
pub async fn publish_catalog(
    state: &AppState,
    catalog: &Catalog,
    actor: &str,
) -> Result<(), ApiError> {
    let now = state.now();
    let store = &state.store;
    let region = Region {
        exchange_rates: catalog.exchange_rates.clone(),
        transfer_price_per_gb: catalog.transfer_price_per_gb.clone(),
        round_trip_ms: catalog.round_trip_ms.clone(),
    };
    let put = |kind: &'static str, name: &str, owner: Option<&str>, body: serde_json::Value| {
        store.put_catalog(
            kind,
            name.to_string(),
            owner.map(str::to_string),
            body,
            actor.to_string(),
            now,
        )
    };
    put("region", "default", None, to_json(&region)).await?;
    for a in &catalog.accelerators {
        put("accelerator", &a.model, None, to_json(a)).await?;
    }
    for p in &catalog.parties {
        put("party", &p.name, None, to_json(p)).await?;
    }
    for p in &catalog.providers {
        put("provider", &p.name, Some(&p.party), to_json(p)).await?;
    }
    for s in &catalog.sites {
        put("site", &s.name, None, to_json(s)).await?;
    }
    for c in &catalog.clusters {
        put("cluster", &c.name, Some(&c.provider), to_json(c)).await?;
    }
    for o in &catalog.offers {
        let owner = catalog
            .clusters
            .iter()
            .find(|c| c.name == o.cluster)
            .map(|c| c.provider.as_str());
        put("offer", &o.cluster, owner, to_json(o)).await?;
    }
    state.reload_catalog().await
}

fn to_json<T: Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).expect("catalog objects serialize")
}

pub(crate) fn check_name(field: &str, name: &str) -> ApiResult<()> {
    if baygrid_core::ids::is_valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::bad(
            field,
            format!("`{name}` is not a name: use 1-63 lowercase letters, digits and `-`"),
        ))
    }
}

/// [`put`] for any serialisable object.
pub(crate) async fn put_json<T: Serialize>(
    state: &AppState,
    kind: &'static str,
    name: &str,
    owner: Option<String>,
    value: &T,
    who: &Principal,
) -> ApiResult<()> {
    let body = serde_json::to_value(value)
        .map_err(|e| ApiError::Unavailable(format!("{kind} `{name}`: {e}")))?;
    put(state, kind, name, owner, body, who).await
}

pub(crate) async fn put(
    state: &AppState,
    kind: &'static str,
    name: &str,
    owner: Option<String>,
    body: serde_json::Value,
    who: &Principal,
) -> ApiResult<()> {
    state
        .store
        .put_catalog(kind, name.to_string(), owner, body, actor(who), state.now())
        .await?;
    state.reload_catalog().await
}

// ---- accelerators, sites, parties, providers: operator publishes, everyone reads ----

#[utoipa::path(get, path = "/api/v1/accelerators", responses((status = 200, body = [AcceleratorModel])), security(("bearer" = [])))]
pub async fn list_accelerators(
    State(state): State<AppState>,
    _who: Principal,
) -> Json<Vec<AcceleratorModel>> {
    Json(state.catalog().accelerators.values().cloned().collect())
}

#[utoipa::path(post, path = "/api/v1/accelerators", request_body = AcceleratorModel, responses((status = 201, body = AcceleratorModel), (status = 400, body = baygrid_api::ErrorBody), (status = 403, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn put_accelerator(
    State(state): State<AppState>,
    who: Principal,
    JsonBody(model): JsonBody<AcceleratorModel>,
) -> ApiResult<(StatusCode, Json<AcceleratorModel>)> {
    require(&who, &[Role::Operator])?;
    if model.model.is_empty()
        || model.model.len() > 63
        || !model
            .model
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(ApiError::bad("model", "use 1-63 letters, digits and `-`"));
    }
    if model.bf16_tflops == 0 {
        return Err(ApiError::bad("bf16_tflops", "must be positive"));
    }
    if model.memory_gb == 0 {
        return Err(ApiError::bad("memory_gb", "must be positive"));
    }
    put(
        &state,
        "accelerator",
        &model.model.clone(),
        None,
        to_json(&model),
        &who,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(model)))
}

#[utoipa::path(get, path = "/api/v1/sites", responses((status = 200, body = [Site])), security(("bearer" = [])))]
pub async fn list_sites(State(state): State<AppState>, _who: Principal) -> Json<Vec<Site>> {
    Json(state.catalog().sites.values().cloned().collect())
}

#[utoipa::path(post, path = "/api/v1/sites", request_body = Site, responses((status = 201, body = Site), (status = 400, body = baygrid_api::ErrorBody), (status = 403, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn put_site(
    State(state): State<AppState>,
    who: Principal,
    JsonBody(site): JsonBody<Site>,
) -> ApiResult<(StatusCode, Json<Site>)> {
    require(&who, &[Role::Operator])?;
    check_name("name", &site.name)?;
    if site.green_share_pct > 100 {
        return Err(ApiError::bad(
            "green_share_pct",
            "must be between 0 and 100",
        ));
    }
    if site.city.trim().is_empty() {
        return Err(ApiError::bad("city", "must not be empty"));
    }
    put(
        &state,
        "site",
        &site.name.clone(),
        None,
        to_json(&site),
        &who,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(site)))
}

#[utoipa::path(get, path = "/api/v1/parties", responses((status = 200, body = [Party])), security(("bearer" = [])))]
pub async fn list_parties(
    State(state): State<AppState>,
    who: Principal,
) -> ApiResult<Json<Vec<Party>>> {
    require(&who, &[Role::Operator, Role::Regulator])?;
    Ok(Json(state.catalog().parties.values().cloned().collect()))
}

#[utoipa::path(post, path = "/api/v1/parties", request_body = Party, responses((status = 201, body = Party), (status = 400, body = baygrid_api::ErrorBody), (status = 403, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn put_party(
    State(state): State<AppState>,
    who: Principal,
    JsonBody(party): JsonBody<Party>,
) -> ApiResult<(StatusCode, Json<Party>)> {
    require(&who, &[Role::Operator])?;
    check_name("name", &party.name)?;
    if party.city.trim().is_empty() {
        return Err(ApiError::bad("city", "must not be empty"));
    }
    put(
        &state,
        "party",
        &party.name.clone(),
        None,
        to_json(&party),
        &who,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(party)))
}

#[utoipa::path(get, path = "/api/v1/providers", responses((status = 200, body = [Provider])), security(("bearer" = [])))]
pub async fn list_providers(State(state): State<AppState>, _who: Principal) -> Json<Vec<Provider>> {
    Json(state.catalog().providers.values().cloned().collect())
}

#[utoipa::path(post, path = "/api/v1/providers", request_body = Provider, responses((status = 201, body = Provider), (status = 400, body = baygrid_api::ErrorBody), (status = 403, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn put_provider(
    State(state): State<AppState>,
    who: Principal,
    JsonBody(provider): JsonBody<Provider>,
) -> ApiResult<(StatusCode, Json<Provider>)> {
    require(&who, &[Role::Operator])?;
    check_name("name", &provider.name)?;
    if !state.catalog().parties.contains_key(&provider.party) {
        return Err(ApiError::bad(
            "party",
            format!("unknown party `{}`", provider.party),
        ));
    }
    put(
        &state,
        "provider",
        &provider.name.clone(),
        Some(provider.party.clone()),
        to_json(&provider),
        &who,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(provider)))
}

// ---- clusters and offers: a provider publishes its own ----

/// Clusters with their agents' status. A provider sees only its own.
#[utoipa::path(get, path = "/api/v1/clusters", responses((status = 200, body = [ClusterView])), security(("bearer" = [])))]
pub async fn list_clusters(
    State(state): State<AppState>,
    who: Principal,
) -> ApiResult<Json<Vec<ClusterView>>> {
    let catalog = state.catalog();
    let status: BTreeMap<String, (i64, serde_json::Value)> = state
        .store
        .cluster_status()
        .await?
        .into_iter()
        .map(|(name, seen, capacity)| (name, (seen, capacity)))
        .collect();
    let mut in_use: BTreeMap<String, u32> = BTreeMap::new();
    for active in state.store.active_allocations().await? {
        let allocation = active.allocation;
        *in_use.entry(allocation.cluster.clone()).or_default() += allocation.total_accelerators();
    }
    let now = state.now();
    let ttl = state.config.lease_ttl.as_millis() as i64;
    let views = catalog
        .clusters
        .values()
        .filter(|c| {
            who.role != Role::Provider || who.subject.as_deref() == Some(c.provider.as_str())
        })
        .map(|c| {
            let seen = status.get(&c.name).map(|(at, _)| *at);
            let reported = status
                .get(&c.name)
                .and_then(|(_, capacity)| serde_json::from_value(capacity.clone()).ok());
            ClusterView {
                reported,
                jurisdiction: catalog
                    .sites
                    .get(&c.site)
                    .map(|s| s.jurisdiction)
                    .unwrap_or(baygrid_core::Jurisdiction::INTL),
                online: seen.is_some_and(|s| now - s <= ttl),
                agent_seen_at: seen.map(millis_to_rfc3339),
                accelerators_total: c.nodes * c.accelerators_per_node,
                accelerators_in_use: in_use.get(&c.name).copied().unwrap_or(0),
                cluster: c.clone(),
            }
        })
        .collect();
    Ok(Json(views))
}

fn may_manage_provider(who: &Principal, provider: &str) -> ApiResult<()> {
    if who.role == Role::Operator || who.is(Role::Provider, provider) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "only the operator or provider `{provider}` may change its clusters and offers"
        )))
    }
}

#[utoipa::path(post, path = "/api/v1/clusters", request_body = Cluster, responses((status = 201, body = Cluster), (status = 400, body = baygrid_api::ErrorBody), (status = 403, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn put_cluster(
    State(state): State<AppState>,
    who: Principal,
    JsonBody(cluster): JsonBody<Cluster>,
) -> ApiResult<(StatusCode, Json<Cluster>)> {
    may_manage_provider(&who, &cluster.provider)?;
    check_cluster(&cluster, "cluster").map_err(
        |baygrid_core::CatalogError::Invalid { field, problem }| {
            ApiError::bad(field.trim_start_matches("cluster."), problem)
        },
    )?;
    let catalog = state.catalog();
    if !catalog.sites.contains_key(&cluster.site) {
        return Err(ApiError::bad(
            "site",
            format!("unknown site `{}`", cluster.site),
        ));
    }
    if !catalog.providers.contains_key(&cluster.provider) {
        return Err(ApiError::bad(
            "provider",
            format!("unknown provider `{}`", cluster.provider),
        ));
    }
    if !catalog.accelerators.contains_key(&cluster.accelerator) {
        return Err(ApiError::bad(
            "accelerator",
            format!("unknown accelerator model `{}`", cluster.accelerator),
        ));
    }
    if let Some(existing) = catalog.clusters.get(&cluster.name) {
        if existing.provider != cluster.provider {
            return Err(ApiError::Conflict(format!(
                "cluster `{}` belongs to provider `{}`",
                cluster.name, existing.provider
            )));
        }
    }
    put(
        &state,
        "cluster",
        &cluster.name.clone(),
        Some(cluster.provider.clone()),
        to_json(&cluster),
        &who,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(cluster)))
}

/// Withdraws a cluster. Queued jobs that only it could hold fail within one cycle.
#[utoipa::path(delete, path = "/api/v1/clusters/{name}", params(("name" = String, Path)), responses((status = 204), (status = 404, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn remove_cluster(
    State(state): State<AppState>,
    who: Principal,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let catalog = state.catalog();
    let cluster = catalog
        .clusters
        .get(&name)
        .ok_or_else(|| ApiError::NotFound(format!("cluster `{name}` not found")))?;
    may_manage_provider(&who, &cluster.provider)?;
    state
        .store
        .remove_catalog("cluster", name.clone(), actor(&who), state.now())
        .await?;
    state
        .store
        .remove_catalog("offer", name, actor(&who), state.now())
        .await?;
    state.reload_catalog().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/offers", responses((status = 200, body = [Offer])), security(("bearer" = [])))]
pub async fn list_offers(State(state): State<AppState>, _who: Principal) -> Json<Vec<Offer>> {
    Json(state.catalog().offers.values().cloned().collect())
}

#[utoipa::path(post, path = "/api/v1/offers", request_body = Offer, responses((status = 201, body = Offer), (status = 400, body = baygrid_api::ErrorBody), (status = 403, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn put_offer(
    State(state): State<AppState>,
    who: Principal,
    JsonBody(offer): JsonBody<Offer>,
) -> ApiResult<(StatusCode, Json<Offer>)> {
    let catalog = state.catalog();
    let cluster = catalog
        .clusters
        .get(&offer.cluster)
        .ok_or_else(|| ApiError::bad("cluster", format!("unknown cluster `{}`", offer.cluster)))?;
    may_manage_provider(&who, &cluster.provider)?;
    if offer.price_per_accelerator_hour.minor <= 0 {
        return Err(ApiError::bad(
            "price_per_accelerator_hour",
            "must be positive",
        ));
    }
    catalog
        .rates
        .rate(offer.price_per_accelerator_hour.currency)
        .map_err(|e| ApiError::bad("price_per_accelerator_hour", e.to_string()))?;
    put(
        &state,
        "offer",
        &offer.cluster.clone(),
        Some(cluster.provider.clone()),
        to_json(&offer),
        &who,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(offer)))
}

// ---- tenants ----

#[utoipa::path(get, path = "/api/v1/tenants", responses((status = 200, body = [TenantView])), security(("bearer" = [])))]
pub async fn list_tenants(
    State(state): State<AppState>,
    who: Principal,
) -> ApiResult<Json<Vec<TenantView>>> {
    let catalog = state.catalog();
    let mut views = Vec::new();
    for tenant in catalog.tenants.values() {
        let visible = matches!(who.role, Role::Operator | Role::Regulator)
            || who.is(Role::Tenant, &tenant.name);
        if !visible {
            continue;
        }
        let wallet = baygrid_ledger::names::wallet(&tenant.name);
        let balance = state.store.ledger_balance(&wallet.id).await?;
        let cny = |v: i128| Money::new(v as i64, baygrid_core::Currency::CNY);
        views.push(TenantView {
            tenant: tenant.clone(),
            spent: cny(balance.debits_posted),
            held: cny(balance.debits_pending),
            available: cny(balance.available()),
        });
    }
    Ok(Json(views))
}

#[utoipa::path(post, path = "/api/v1/tenants", request_body = Tenant, responses((status = 201, body = Tenant), (status = 400, body = baygrid_api::ErrorBody), (status = 403, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn put_tenant(
    State(state): State<AppState>,
    who: Principal,
    JsonBody(tenant): JsonBody<Tenant>,
) -> ApiResult<(StatusCode, Json<Tenant>)> {
    require(&who, &[Role::Operator])?;
    check_name("name", &tenant.name)?;
    if !state.catalog().parties.contains_key(&tenant.party) {
        return Err(ApiError::bad(
            "party",
            format!("unknown party `{}`", tenant.party),
        ));
    }
    if tenant.budget.currency != baygrid_core::Currency::CNY {
        return Err(ApiError::bad(
            "budget",
            "budgets are kept in CNY, e.g. `10000.00 CNY`",
        ));
    }
    if tenant.budget.minor < 0 {
        return Err(ApiError::bad("budget", "must not be negative"));
    }
    let is_new = !state.catalog().tenants.contains_key(&tenant.name);
    put(
        &state,
        "tenant",
        &tenant.name.clone(),
        Some(tenant.party.clone()),
        to_json(&tenant),
        &who,
    )
    .await?;
    if is_new {
        // the budget is the wallet's opening deposit; later funds come by `ledger deposit`
        crate::ledger::open_tenant(&state, &tenant.name, tenant.budget, &who).await?;
    }
    Ok((StatusCode::CREATED, Json(tenant)))
}

// ---- tokens ----

#[utoipa::path(post, path = "/api/v1/tokens", request_body = IssueTokenRequest, responses((status = 201, body = IssuedToken), (status = 400, body = baygrid_api::ErrorBody), (status = 403, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn issue_token(
    State(state): State<AppState>,
    who: Principal,
    JsonBody(request): JsonBody<IssueTokenRequest>,
) -> ApiResult<(StatusCode, Json<IssuedToken>)> {
    require(&who, &[Role::Operator])?;
    let catalog = state.catalog();
    match (request.role.needs_subject(), &request.subject) {
        (true, None) => {
            return Err(ApiError::bad(
                "subject",
                format!("a {} token needs a subject", request.role),
            ))
        }
        (false, Some(_)) => {
            return Err(ApiError::bad(
                "subject",
                format!("a {} token takes no subject", request.role),
            ))
        }
        _ => {}
    }
    if let Some(subject) = &request.subject {
        let known = match request.role {
            Role::Tenant => catalog.tenants.contains_key(subject),
            Role::Provider => catalog.providers.contains_key(subject),
            Role::DataHolder => catalog.parties.contains_key(subject),
            Role::Agent => catalog.clusters.contains_key(subject),
            Role::Operator | Role::Regulator => true,
        };
        if !known {
            let what = match request.role {
                Role::Tenant => "tenant",
                Role::Provider => "provider",
                Role::DataHolder => "party",
                _ => "cluster",
            };
            return Err(ApiError::bad(
                "subject",
                format!("unknown {what} `{subject}`"),
            ));
        }
    }
    let expires_ms = match request.expires_in.as_deref() {
        None => None,
        Some(text) => {
            let ttl = humantime::parse_duration(text).map_err(|e| {
                ApiError::bad("expires_in", format!("`{text}` is not a duration: {e}"))
            })?;
            if ttl.is_zero() || ttl > std::time::Duration::from_secs(10 * 366 * 86_400) {
                return Err(ApiError::bad(
                    "expires_in",
                    format!("`{text}`: a token lasts longer than zero and at most ten years"),
                ));
            }
            Some(state.now() + ttl.as_millis() as i64)
        }
    };
    let label = request.label.clone().unwrap_or_default();
    let (record, secret) = crate::auth::issue(
        &state,
        request.role,
        request.subject.clone(),
        label,
        expires_ms,
        &actor(&who),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(IssuedToken {
            id: record.id,
            token: secret,
            role: record.role,
            subject: record.subject,
            expires_at: record.expires_ms.map(millis_to_rfc3339),
        }),
    ))
}

#[utoipa::path(get, path = "/api/v1/tokens", responses((status = 200, body = [TokenView])), security(("bearer" = [])))]
pub async fn list_tokens(
    State(state): State<AppState>,
    who: Principal,
) -> ApiResult<Json<Vec<TokenView>>> {
    require(&who, &[Role::Operator])?;
    let tokens = state.store.list_tokens().await?;
    Ok(Json(
        tokens
            .into_iter()
            .map(|t| TokenView {
                id: t.id,
                role: t.role,
                subject: t.subject,
                label: t.label,
                created_at: millis_to_rfc3339(t.created_ms),
                revoked_at: t.revoked_ms.map(millis_to_rfc3339),
                expires_at: t.expires_ms.map(millis_to_rfc3339),
            })
            .collect(),
    ))
}

#[utoipa::path(delete, path = "/api/v1/tokens/{id}", params(("id" = String, Path)), responses((status = 204), (status = 404, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn revoke_token(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    require(&who, &[Role::Operator])?;
    let revoked = state
        .store
        .revoke_token(id.clone(), actor(&who), state.now())
        .await?;
    state.tokens.clear();
    if revoked {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("no live token `{id}`")))
    }
}

//! The OpenAPI 3 document at `/api/v1/openapi.json`, generated from the handlers, and
//! Swagger UI over it at `/api/v1/docs/` (its files built into the binary).

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::{agent, audit, catalog, contracts, flows, fusion, jobs, ledger, queries, zone};

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "baygrid", description = "Compute-and-data exchange for the Greater Bay Area"),
    modifiers(&BearerAuth),
    paths(
        crate::health,
        catalog::list_accelerators, catalog::put_accelerator,
        catalog::list_sites, catalog::put_site,
        catalog::list_parties, catalog::put_party,
        catalog::list_providers, catalog::put_provider,
        catalog::list_clusters, catalog::put_cluster, catalog::remove_cluster,
        catalog::list_offers, catalog::put_offer,
        catalog::list_tenants, catalog::put_tenant,
        catalog::issue_token, catalog::list_tokens, catalog::revoke_token,
        jobs::submit, jobs::quote, jobs::list, jobs::get, jobs::logs, jobs::cancel,
        agent::register, agent::heartbeat, agent::lease, agent::report,
        zone::list_evidence, zone::put_evidence, zone::decide,
        zone::list_datasets, zone::get_dataset, zone::register_dataset, zone::add_version, zone::list_vaults,
        contracts::list_offers, contracts::publish_offer, contracts::list_contracts, contracts::request_contract, contracts::approve, contracts::revoke,
        flows::request, flows::list, flows::get, flows::report, zone::obligations,
        queries::submit, queries::list, queries::get, queries::claim, queries::answer, queries::relay_send, queries::relay_receive,
        fusion::submit, fusion::list, fusion::get, fusion::logs, fusion::cancel, fusion::relay_send, fusion::relay_receive, fusion::report,
        ledger::list_accounts, ledger::get_account, ledger::statement, ledger::deposit, ledger::invoice,
        audit::checkpoint, audit::key, audit::list_entries, audit::get_entry, audit::inclusion, audit::consistency,
    ),
    components(schemas(baygrid_api::ErrorBody, baygrid_core::Money, baygrid_core::Jurisdiction))
)]
pub struct ApiDoc;

pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// Swagger UI at `/api/v1/docs/`, reading the document the API serves.
pub fn browser<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    utoipa_swagger_ui::SwaggerUi::new("/api/v1/docs")
        .config(utoipa_swagger_ui::Config::from("/api/v1/openapi.json"))
        .into()
}

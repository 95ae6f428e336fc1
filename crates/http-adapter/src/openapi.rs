//! The router: every documented route with its OpenAPI description (generated from the
//! handlers, so the two cannot drift apart), `GET /openapi.json`, and the ops-only router of
//! processor processes.

use std::sync::Arc;

use axum::Json;
use tracktrace_domain::FieldError;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, Problem};
use crate::layers;
use crate::routes::{analytics, capture, milestones, ops, tenants, trace};
use crate::state::HttpState;

#[derive(OpenApi)]
#[openapi(
    info(title = "tracktrace Track & Trace API", description = "Operational event capture and per-entity traces."),
    modifiers(&BearerAuth),
    components(schemas(Problem, FieldError))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// Answers every `/api/v1` operation may give whatever its handler does, from the layers of
/// [`crate::layers`] and the store: 503 + `Retry-After` (shed beyond the in-flight limit, the
/// request timeout, or a dependency unavailable), and for operations that write, 507 +
/// `Retry-After` (the event store's disk is full: nothing was stored).
struct ServerLimits;

impl utoipa::Modify for ServerLimits {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::schema::{Object, Type};
        use utoipa::openapi::{ContentBuilder, HeaderBuilder, Ref, ResponseBuilder};
        let answer = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .header(
                    "Retry-After",
                    HeaderBuilder::new()
                        .schema(Some(Object::with_type(Type::Integer)))
                        .description(Some("seconds to wait before retrying"))
                        .build(),
                )
                .content(
                    "application/problem+json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("Problem")))
                        .build(),
                )
                .build()
        };
        for (path, item) in openapi.paths.paths.iter_mut() {
            if !path.starts_with("/api/v1/") {
                continue;
            }
            let ops = [
                (false, item.get.as_mut()),
                (true, item.post.as_mut()),
                (true, item.put.as_mut()),
                (true, item.delete.as_mut()),
            ];
            for (writes, op) in ops {
                let Some(op) = op else { continue };
                let responses = &mut op.responses.responses;
                match responses.get_mut("503") {
                    Some(utoipa::openapi::RefOr::T(r)) => {
                        r.description.push_str(
                            "; or the server is at its limit of requests in flight \
                             (`/problems/overloaded`) or the request timed out \
                             (`/problems/request-timeout`)",
                        );
                        r.headers.entry("Retry-After".into()).or_insert_with(|| {
                            HeaderBuilder::new()
                                .schema(Some(Object::with_type(Type::Integer)))
                                .description(Some("seconds to wait before retrying"))
                                .build()
                                .into()
                        });
                    }
                    Some(_) => {}
                    None => {
                        responses.insert(
                            "503".into(),
                            answer(
                                "The server is at its limit of requests in flight \
                                 (`/problems/overloaded`), the request timed out \
                                 (`/problems/request-timeout`), or a dependency is unavailable \
                                 (`/problems/unavailable`)",
                            )
                            .into(),
                        );
                    }
                }
                if writes {
                    responses.entry("507".into()).or_insert_with(|| {
                        answer(
                            "The event store's disk is full: nothing was stored \
                             (`/problems/insufficient-storage`)",
                        )
                        .into()
                    });
                }
            }
        }
    }
}

/// The documented routes and their OpenAPI description.
pub fn api_routes() -> (axum::Router<HttpState>, utoipa::openapi::OpenApi) {
    let r = OpenApiRouter::with_openapi(ApiDoc::openapi());
    #[cfg(feature = "nats")]
    let r = {
        use crate::routes::propagation;
        r.routes(routes!(propagation::add_route, propagation::list_routes))
            .routes(routes!(propagation::get_route, propagation::remove_route))
    };
    let r = r
        .routes(routes!(capture::capture))
        .routes(routes!(capture::capture_batch))
        .routes(routes!(trace::trace))
        .routes(routes!(trace::subscribe))
        .routes(routes!(tenants::create_tenant, tenants::list_tenants))
        .routes(routes!(tenants::suspend_tenant))
        .routes(routes!(tenants::resume_tenant))
        .routes(routes!(tenants::list_schemas))
        .routes(routes!(tenants::put_schema, tenants::delete_schema))
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::scrape_metrics))
        .routes(routes!(analytics::run_analytics))
        .routes(routes!(analytics::list_kpis))
        .routes(routes!(analytics::list_anomalies))
        .routes(routes!(analytics::get_config, analytics::put_config))
        .routes(routes!(milestones::list_rules))
        .routes(routes!(
            milestones::put_rule,
            milestones::get_rule,
            milestones::delete_rule
        ))
        .routes(routes!(milestones::entity_watches));
    let (router, mut doc) = r.split_for_parts();
    // After the routes: the operations exist now.
    utoipa::Modify::modify(&ServerLimits, &mut doc);
    (router, doc)
}

/// The whole API, ready to serve: every documented route plus `GET /openapi.json`, behind
/// the middleware of [`crate::layers`].
pub fn router(state: HttpState) -> axum::Router {
    let (routes, openapi) = api_routes();
    let doc = Arc::new(openapi);
    let limits = state.limits();
    let router = routes
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { Json((*doc).clone()) }
            }),
        )
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .with_state(state);
    layers::apply(router, limits)
}

/// Only `/healthz`, `/readyz` and `/metrics` (processes with role `processor`), behind the
/// same middleware.
pub fn ops_router(state: HttpState) -> axum::Router {
    let limits = state.limits();
    let router = axum::Router::new()
        .route("/healthz", axum::routing::get(ops::healthz))
        .route("/readyz", axum::routing::get(ops::readyz))
        .route("/metrics", axum::routing::get(ops::scrape_metrics))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .with_state(state);
    layers::apply(router, limits)
}

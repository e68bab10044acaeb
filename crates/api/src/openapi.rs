//! The daemon API's OpenAPI 3.1 document, served at `GET /openapi.json`.
//!
//! Generated, not written: each handler's `#[utoipa::path]` gives its
//! operation (and the router its path and methods, see
//! [`crate::routes::api`]); the bodies' schemas come from the types in
//! `api-types` (`ToSchema`, their doc comments the descriptions); the
//! error sets below are the `{"error": …}` answers routes share.

use std::sync::LazyLock;

use api_types::ErrorBody;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{IntoResponses, Modify, OpenApi};

/// The security scheme every authenticated operation names.
pub const API_KEY: &str = "api_key";
/// The security scheme of the share page's token-authenticated calls.
pub const SHARE_TOKEN: &str = "share_token";

/// What the handlers' paths do not say: title, auth, tags, the schemas of
/// the WebSocket and NDJSON messages (no body refers to them).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "bhatti",
        description = "The bhatti daemon's REST/WebSocket API (its API listener; \
            the public proxy is not part of it). Every operation but `GET /health` \
            and `GET /openapi.json` needs `Authorization: Bearer <API key>`. \
            Failures answer `{\"error\": \"…\"}`. Sandboxes are addressed by id or \
            name; another user's sandbox, secret or session is a 404. Generated \
            from the daemon's handlers and body types; see docs/api.md for the \
            prose."
    ),
    modifiers(&BearerKey),
    security(("api_key" = [])),
    components(schemas(ErrorBody, api_types::ExecLine, api_types::ShellOpen, api_types::ShellControl, api_types::ShareOpen)),
    tags(
        (name = "meta", description = "Health and this document (no API key)."),
        (name = "sandboxes", description = "Sandboxes and their life cycle."),
        (name = "guest", description = "Commands, files, sessions and the shell inside a sandbox."),
        (name = "ports", description = "Ports in a sandbox: listing, the authenticated proxy, tunnels, publishing."),
        (name = "secrets", description = "The caller's encrypted secrets."),
        (name = "images", description = "Images sandboxes boot from (tiers, and OCI images users pull, import or save from a sandbox: long work as tasks), and each user's templates of them (creates that restore instead of boot); see docs/images.md and docs/state.md."),
        (name = "checkpoints", description = "Checkpoints of sandboxes (memory and disk at an instant), rollbacks and forks; see docs/state.md."),
        (name = "volumes", description = "The caller's persistent volumes, attached to sandboxes at create; see docs/state.md."),
        (name = "observability", description = "Events and metrics (docs/operations.md)."),
        (name = "e2b", description = "E2B compatibility: the E2B sandbox API and envd's in-sandbox API for the stock `e2b` SDKs (`X-API-Key` / `X-Access-Token` auth, E2B's and Connect's error shapes); see docs/clients.md."),
        (name = "share", description = "Share links and the browser terminal; see docs/clients.md. The page and its files need no key; `/share/info` and `/share/ws` take a share token."),
        (name = "mcp", description = "The MCP server (streamable HTTP transport): the sandbox tools for MCP clients; see docs/clients.md."),
    )
)]
struct Base;

/// `Authorization: Bearer <key>`: keys come from `bhatti user create`.
struct BearerKey;

impl Modify for BearerKey {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let mut http = Http::new(HttpAuthScheme::Bearer);
        http.description = Some("An API key (`bht_…`) from `bhatti user create`.".into());
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(API_KEY, SecurityScheme::Http(http));
        let mut share = Http::new(HttpAuthScheme::Bearer);
        share.description = Some(
            "A share token (`bhs_…`) from `POST /sandboxes/{id}/share`; on `/share/ws` it is \
             the first message's `token` instead (browsers cannot set WebSocket headers)."
                .into(),
        );
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(SHARE_TOKEN, SecurityScheme::Http(share));
    }
}

/// The document's base: everything but the paths.
pub fn base() -> utoipa::openapi::OpenApi {
    let mut doc = Base::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc
}

/// The whole document: [`base`] with the paths of every route.
pub fn document() -> utoipa::openapi::OpenApi {
    crate::routes::parts().1
}

/// [`document`] as served, built once.
static SERVED: LazyLock<String> = LazyLock::new(|| match document().to_json() {
    Ok(json) => json,
    // Serialising plain strings and maps does not fail; if it ever did,
    // the answer still is JSON.
    Err(e) => serde_json::json!({ "error": format!("cannot render the OpenAPI document: {e}") })
        .to_string(),
});

/// `GET /openapi.json`: this document. Public like `/health`: it says
/// nothing about any user or sandbox.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "meta",
    security(()),
    responses((status = 200, description = "This OpenAPI 3.1 document.", content_type = "application/json", body = Object))
)]
pub async fn serve() -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        SERVED.as_str(),
    )
        .into_response()
}

/// The axum path of a route as the document writes it: a catch-all
/// `{*rest}` is the parameter `{rest}` (OpenAPI has no catch-all; its
/// description says it may hold `/`).
pub fn document_path(axum_path: &str) -> String {
    axum_path.replace("{*", "{")
}

/// One handler for several methods (the proxy's) gives each the same
/// `operationId`, which must be unique: those get their method appended
/// (`proxy_rest_get`, …).
pub fn unique_operation_ids(doc: &mut utoipa::openapi::OpenApi) {
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for item in doc.paths.paths.values() {
        for (_, op) in operations(item) {
            if let Some(id) = &op.operation_id {
                *seen.entry(id.clone()).or_default() += 1;
            }
        }
    }
    for item in doc.paths.paths.values_mut() {
        for (method, op) in operations_mut(item) {
            if let Some(id) = &mut op.operation_id {
                if seen.get(id.as_str()).is_some_and(|n| *n > 1) {
                    id.push('_');
                    id.push_str(method);
                }
            }
        }
    }
}

type Op = utoipa::openapi::path::Operation;

/// A path item's operations with their methods.
fn operations(item: &utoipa::openapi::PathItem) -> Vec<(&'static str, &Op)> {
    let all = [
        ("get", &item.get),
        ("put", &item.put),
        ("post", &item.post),
        ("delete", &item.delete),
        ("options", &item.options),
        ("head", &item.head),
        ("patch", &item.patch),
        ("trace", &item.trace),
    ];
    all.into_iter()
        .filter_map(|(m, op)| op.as_ref().map(|op| (m, op)))
        .collect()
}

fn operations_mut(item: &mut utoipa::openapi::PathItem) -> Vec<(&'static str, &mut Op)> {
    let all = [
        ("get", &mut item.get),
        ("put", &mut item.put),
        ("post", &mut item.post),
        ("delete", &mut item.delete),
        ("options", &mut item.options),
        ("head", &mut item.head),
        ("patch", &mut item.patch),
        ("trace", &mut item.trace),
    ];
    all.into_iter()
        .filter_map(|(m, op)| op.as_mut().map(|op| (m, op)))
        .collect()
}

/// Raw bytes: a file's content, a proxied body (`type: string` with its
/// media type, as OpenAPI 3.1 writes binary data).
#[derive(Debug)]
pub struct Binary;

impl utoipa::PartialSchema for Binary {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .content_media_type("application/octet-stream")
            .into()
    }
}

impl utoipa::ToSchema for Binary {}

/// Answers of every authenticated operation.
#[derive(Debug, IntoResponses)]
pub enum Authed {
    /// No `Authorization: Bearer <key>` header, or a key no user has.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The caller's rate limit for this class of request (create, exec or
    /// read) is spent, or the guest has too many sessions or connections.
    #[response(
        status = 429,
        headers(("Retry-After" = u64, description = "Seconds until a retry may succeed."))
    )]
    RateLimited(ErrorBody),
    /// The daemon failed (its store, its secrets); the message says how.
    #[response(status = 500)]
    Internal(ErrorBody),
}

/// Answers of operations for admin keys only.
#[derive(Debug, IntoResponses)]
pub enum AdminOnly {
    /// The key is not an admin key (`admins` in the daemon's config).
    #[response(status = 403)]
    Forbidden(ErrorBody),
}

/// Answers of operations with a body, query or parameter to check.
#[derive(Debug, IntoResponses)]
pub enum Invalid {
    /// The request is refused as written: a body that is not the JSON
    /// type (unknown fields too), a bad query or path parameter, a value
    /// out of range, or the like.
    #[response(status = 400)]
    BadRequest(ErrorBody),
}

/// Answers of operations with a JSON body.
#[derive(Debug, IntoResponses)]
pub enum JsonTooLarge {
    /// The JSON body is over `[limits] max_json_body` (1 MiB by default).
    #[response(status = 413)]
    PayloadTooLarge(ErrorBody),
}

/// Answers of operations on one thing of the caller's.
#[derive(Debug, IntoResponses)]
pub enum Missing {
    /// No such sandbox (or secret, publication, file, session) for the
    /// caller; another user's is one too.
    #[response(status = 404)]
    NotFound(ErrorBody),
}

/// Answers of operations that reach the guest (waking the sandbox first).
#[derive(Debug, IntoResponses)]
pub enum Guest {
    /// The sandbox is in no state for it (being created or destroyed, not
    /// running), or a session is attached elsewhere.
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// The VM died or its agent broke the exchange.
    #[response(status = 502)]
    BadGateway(ErrorBody),
    /// The sandbox's VM is not there, or its circuit breaker is open
    /// after a failed restore (`POST /sandboxes/{id}/start?force=true`).
    #[response(status = 503)]
    Unavailable(ErrorBody),
    /// A call into the guest passed its deadline.
    #[response(status = 504)]
    GatewayTimeout(ErrorBody),
}

use axum::extract::State;
use axum::Json;

use crate::state::AppState;

/// `GET /health`: the daemon's version and VM engine. No API key.
#[utoipa::path(
    get,
    path = "/health",
    operation_id = "health",
    tag = "meta",
    security(()),
    responses((status = 200, description = "The daemon is up.", body = api_types::Health))
)]
pub async fn health(State(state): State<AppState>) -> Json<api_types::Health> {
    Json(state.health.clone())
}

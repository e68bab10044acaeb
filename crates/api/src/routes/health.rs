use axum::extract::State;
use axum::Json;

use crate::state::AppState;

pub async fn health(State(state): State<AppState>) -> Json<api_types::Health> {
    Json(state.health.clone())
}

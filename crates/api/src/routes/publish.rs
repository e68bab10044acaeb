//! `POST /sandboxes/:id/publish` and `DELETE /sandboxes/:id/publish/:port`:
//! a sandbox port under a public alias (served by the public proxy, see
//! [`crate::publish`]).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use crate::auth::User;
use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::openapi::{Authed, Invalid, JsonTooLarge, Missing};
use crate::ratelimit::Class;
use crate::state::AppState;

/// `POST /sandboxes/:id/publish`: 201 with the publication, 200 when the
/// port already was published (under the alias asked for, if any).
#[utoipa::path(
    post,
    path = "/sandboxes/{id}/publish",
    operation_id = "publish_port",
    tag = "ports",
    params(("id" = String, Path, description = "The sandbox's id or name.")),
    request_body = api_types::PublishPort,
    responses(
        (status = 201, description = "Published.", body = api_types::Published),
        (status = 200, description = "The port already was published (under the alias asked for, if any).", body = api_types::Published),
        (status = 403, description = "Publishing is off in this daemon.", body = api_types::ErrorBody),
        (status = 409, description = "The alias is taken, or the port is published under another alias.", body = api_types::ErrorBody),
        Authed, Invalid, JsonTooLarge, Missing
    )
)]
pub async fn publish(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<api_types::PublishPort>,
) -> Result<(StatusCode, Json<api_types::Published>), ApiError> {
    state.limit(&user, Class::Read)?;
    let (created, published) = state.service.publish(&user, &id, body).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(published)))
}

/// A port from the URL: 1-65535.
pub fn parse_port(s: &str) -> Result<u16, ApiError> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(ApiError::BadRequest(format!(
            "invalid port '{s}': expected 1-65535"
        ))),
    }
}

/// `DELETE /sandboxes/:id/publish/:port`: 204, or 404 when not published.
#[utoipa::path(
    delete,
    path = "/sandboxes/{id}/publish/{port}",
    operation_id = "unpublish_port",
    tag = "ports",
    params(
        ("id" = String, Path, description = "The sandbox's id or name."),
        ("port" = u16, Path, minimum = 1, maximum = 65535, description = "The published port, 1-65535."),
    ),
    responses(
        (status = 204, description = "Unpublished."),
        Authed, Invalid, Missing
    )
)]
pub async fn unpublish(
    State(state): State<AppState>,
    User(user): User,
    Path((id, port)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.limit(&user, Class::Read)?;
    let port = parse_port(&port)?;
    state.service.unpublish(&user, &id, port).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::parse_port;

    #[test]
    fn ports() {
        assert_eq!(parse_port("3000").unwrap(), 3000);
        assert_eq!(parse_port("65535").unwrap(), 65535);
        for bad in ["0", "65536", "-1", "", "80a", " 80"] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
    }
}

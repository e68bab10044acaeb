//! Extractors whose rejections are JSON `{"error": …}` like every other error.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// `Json<T>` with 400/413 JSON errors (unknown fields, bad types, too large).
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(JsonBody(v)),
            Err(JsonRejection::BytesRejection(e))
                if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE =>
            {
                Err(ApiError::PayloadTooLarge("request body too large".into()))
            }
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::BadRequest(
                "expected a JSON body with Content-Type: application/json".into(),
            )),
            Err(e) => Err(ApiError::BadRequest(format!(
                "invalid JSON body: {}",
                e.body_text()
            ))),
        }
    }
}

/// `Query<T>` with 400 JSON errors (negative or non-numeric sizes, unknown parameters…).
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(QueryParams(v)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => Err(ApiError::BadRequest(
                format!("invalid query parameters: {}", e.body_text()),
            )),
            Err(e) => Err(ApiError::BadRequest(e.body_text())),
        }
    }
}

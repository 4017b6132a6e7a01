//! Checking the `application/problem+json` error answers of the ingest API.

use serde_json::Value;

/// Asserts that `response` is an RFC 9457 problem with this status: content type
/// `application/problem+json`, a body with non-empty string `type`, `title`, `detail` and
/// `instance`, a numeric `status` equal to the HTTP status, and a `detail` containing every one of
/// `detail_contains`. `what` names the request in failure messages. Returns the body.
pub async fn assert_problem(
    what: &str,
    response: reqwest::Response,
    status: u16,
    detail_contains: &[&str],
) -> Value {
    let actual = response.status().as_u16();
    let content_type = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let text = response.text().await.unwrap_or_default();
    assert_eq!(actual, status, "{what}: status; body: {text}");
    assert!(
        content_type.starts_with("application/problem+json"),
        "{what}: a {status} must be application/problem+json, got content-type {content_type:?}; body: {text}"
    );
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{what}: problem body is not JSON ({e}): {text}"));
    for field in ["type", "title", "detail", "instance"] {
        assert!(
            body[field].as_str().is_some_and(|s| !s.is_empty()),
            "{what}: problem field {field:?} must be a non-empty string: {body}"
        );
    }
    assert_eq!(
        body["status"].as_u64(),
        Some(u64::from(status)),
        "{what}: problem status: {body}"
    );
    let detail = body["detail"].as_str().unwrap_or_default();
    for needle in detail_contains {
        assert!(
            detail.contains(needle),
            "{what}: problem detail should contain {needle:?}: {detail:?}"
        );
    }
    body
}

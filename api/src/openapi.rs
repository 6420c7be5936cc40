//! The OpenAPI document served at `/openapi.json`, derived with utoipa: the
//! schemas from the wire types (`wire.rs`, `ToSchema`), the query parameters
//! from the query structs (`IntoParams`), and each operation, with the answers
//! it documents, from the `#[utoipa::path]` beside its handler.
//!
//! The router refuses a query parameter its route does not document
//! ([`query_names`] reads this document), so what is documented is what is
//! accepted; `tests/it/openapi.rs` calls every operation and checks each answer
//! against its documented status and schema.

use std::sync::LazyLock;

use axum::Json;
use serde_json::Value;
use utoipa::openapi::schema::{OneOfBuilder, Schema};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::wire;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Threadline",
        description = "Event-sourced routing of AI agents' run events to users' sockets. Wire contract: docs/PROTOCOL.md."
    ),
    paths(
        crate::http::create_thread,
        crate::http::list_threads,
        crate::http::get_thread,
        crate::http::register_run,
        crate::http::thread_events,
        crate::http::append_event,
        crate::http::append_batch,
        crate::http::cancel_run,
        crate::http::provide_input,
        crate::http::run_signals,
        crate::http::presence,
        crate::http::audit_events,
        crate::http::audit_deliveries,
        crate::http::start_verify,
        crate::http::verify_status,
        crate::ws::upgrade,
        crate::http::healthz,
        crate::http::readyz,
        crate::metrics::render,
        document,
        crate::console::index,
        crate::console::script,
        crate::console::style,
    ),
    modifiers(&CommonAnswers),
)]
struct ApiDoc;

/// The document, built once.
static SPEC: LazyLock<Value> = LazyLock::new(|| {
    serde_json::to_value(ApiDoc::openapi()).expect("the OpenAPI document serializes")
});

/// The whole document.
pub fn spec() -> &'static Value {
    &SPEC
}

/// This document (OpenAPI 3.1).
#[utoipa::path(get, path = "/openapi.json", tag = "operations", operation_id = "openapi",
    responses((status = 200, description = "the OpenAPI document of this API", body = Object)))]
pub async fn document() -> Json<&'static Value> {
    Json(spec())
}

/// The query parameters `method path` documents (`None` when the document has no
/// such operation). A HEAD is answered by the GET operation.
pub fn query_names(method: &str, path: &str) -> Option<impl Iterator<Item = &'static str>> {
    let method = if method.eq_ignore_ascii_case("head") {
        "get"
    } else {
        method
    };
    let (_, operation) = spec()["paths"]
        .get(path)?
        .as_object()?
        .iter()
        .find(|(m, _)| m.eq_ignore_ascii_case(method))?;
    let parameters = operation["parameters"].as_array().map(Vec::as_slice);
    Some(
        parameters
            .unwrap_or_default()
            .iter()
            .filter(|p| p["in"] == "query")
            .filter_map(|p| p["name"].as_str()),
    )
}

/// What every operation may answer besides its own list: the bearer scheme its
/// `security` names, and the errors of the layers in front of every handler.
struct CommonAnswers;

impl Modify for CommonAnswers {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .bearer_format("JWT")
                        .build(),
                ),
            );
        for item in doc.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ];
            for operation in operations.into_iter().flatten() {
                let authenticated = operation.security.is_some();
                let has_body = operation.request_body.is_some();
                let answers = &mut operation.responses.responses;
                let mut add = |status: u16, description: &str| {
                    answers
                        .entry(status.to_string())
                        .or_insert_with(|| error_response(description));
                };
                add(
                    400,
                    "invalid_request: a query parameter this call does not know",
                );
                if has_body {
                    add(
                        408,
                        "request_timeout: the body did not arrive within the header deadline",
                    );
                }
                if authenticated {
                    add(
                        429,
                        "rate_limited: over the caller's request rate; see Retry-After",
                    );
                }
                add(503, UNAVAILABLE);
                // An operation that documents its own 503 (`/readyz`) still meets the
                // connection limit: that answer is either body.
                if let Some(RefOr::T(own)) = answers.get_mut("503") {
                    if let Some(json) = own.content.get_mut("application/json") {
                        if let Some(schema) = json.schema.take().filter(|s| *s != error_schema()) {
                            json.schema =
                                Some(OneOfBuilder::new().item(schema).item(error_schema()).into());
                            own.description =
                                format!("{}; or (the Error body) {UNAVAILABLE}", own.description);
                        } else {
                            json.schema = Some(error_schema());
                        }
                    }
                }
            }
        }
    }
}

/// What any call may answer with 503.
const UNAVAILABLE: &str = "overloaded: the server is at its connection limit, or a thread kept \
    changing under every attempt; storage_unavailable: the event log cannot make writes durable. \
    See Retry-After where given";

fn error_schema() -> RefOr<Schema> {
    Ref::from_schema_name(wire::ErrorBody::name()).into()
}

fn error_response(description: &str) -> RefOr<Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new().schema(Some(error_schema())).build(),
        )
        .build()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn operation(method: &str, path: &str) -> &'static Value {
        &spec()["paths"][path][method]
    }

    fn parameter(method: &str, path: &str, name: &str) -> &'static Value {
        operation(method, path)["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{method} {path} has no parameter {name}"))
    }

    fn schema(name: &str) -> &'static Value {
        &spec()["components"]["schemas"][name]
    }

    #[test]
    fn every_limit_is_documented_as_the_server_checks_it() {
        for path in [
            "/v1/threads",
            "/v1/threads/{thread_id}/events",
            "/v1/audit/events",
            "/v1/audit/deliveries",
        ] {
            let limit = &parameter("get", path, "limit")["schema"];
            assert_eq!(limit["minimum"], 1, "{path}: {limit}");
            assert_eq!(limit["maximum"], crate::MAX_LIMIT, "{path}: {limit}");
            assert_eq!(limit["default"], 100, "{path}: {limit}");
        }
        let events = &schema("Batch")["properties"]["events"];
        assert_eq!(events["maxItems"], crate::MAX_BATCH, "{events}");
        assert_eq!(events["minItems"], 1, "{events}");
    }

    #[test]
    fn the_query_names_are_those_of_the_query_structs() {
        let names = |m, p| query_names(m, p).map(|n| n.collect::<Vec<_>>());
        assert_eq!(
            names("GET", "/v1/threads"),
            Some(vec!["user_id", "limit", "after"])
        );
        assert_eq!(
            names("HEAD", "/v1/threads/{thread_id}/events"),
            Some(vec!["after_version", "limit"])
        );
        assert_eq!(
            names("GET", "/v1/audit/events"),
            Some(vec![
                "after",
                "limit",
                "user_id",
                "thread_id",
                "run_id",
                "type",
                "since",
                "until"
            ])
        );
        assert_eq!(
            names("GET", "/v1/ws"),
            Some(vec![
                "after",
                "client_id",
                "thread_id",
                "access_token",
                "merge"
            ])
        );
        assert_eq!(names("POST", "/v1/threads"), Some(vec![]));
        assert_eq!(names("GET", "/nowhere"), None);
    }

    #[test]
    fn the_event_types_are_the_engines() {
        use threadline_engine::AgentEventKind;
        let agent: Vec<&str> = AgentEventKind::ALL
            .iter()
            .map(|k| k.as_str())
            .chain(crate::wire::MESSAGE_EVENT_TYPES)
            .chain([threadline_engine::INPUT_REQUESTED])
            .collect();
        assert_eq!(
            schema("AgentEvent")["properties"]["type"]["enum"],
            serde_json::json!(agent)
        );
        let frame = schema("Frame")["properties"]["event"]["enum"]
            .as_array()
            .unwrap();
        for name in agent
            .iter()
            .chain(&["thread_created"])
            .chain(&threadline_engine::THREAD_EVENT_NAMES)
        {
            assert!(
                frame.iter().any(|n| n == name),
                "{name} is not in {frame:?}"
            );
        }
    }

    #[test]
    fn a_503_of_readyz_is_either_body() {
        let answer = &operation("get", "/readyz")["responses"]["503"];
        let choices = &answer["content"]["application/json"]["schema"]["oneOf"];
        assert_eq!(
            choices,
            &serde_json::json!([
                {"$ref": "#/components/schemas/Ready"},
                {"$ref": "#/components/schemas/Error"}
            ]),
            "{answer}"
        );
        let ready = &operation("get", "/readyz")["responses"]["200"]["content"];
        assert_eq!(
            ready["application/json"]["schema"]["$ref"],
            "#/components/schemas/Ready"
        );
    }

    #[test]
    fn every_authenticated_operation_names_the_bearer_scheme() {
        let scheme = &spec()["components"]["securitySchemes"]["bearer"];
        assert_eq!(scheme["scheme"], "bearer");
        for (path, item) in spec()["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let open = matches!(
                    path.as_str(),
                    "/healthz"
                        | "/readyz"
                        | "/metrics"
                        | "/openapi.json"
                        | "/console"
                        | "/console/app.js"
                        | "/console/app.css"
                );
                assert_eq!(op.get("security").is_none(), open, "{method} {path}");
                assert!(op["responses"]["503"].is_object(), "{method} {path}");
                assert_eq!(op["responses"]["429"].is_object(), !open, "{method} {path}");
            }
        }
    }
}

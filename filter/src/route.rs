//! Which of the gateway's endpoints a request's method and path name.

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Outside `/v1/`: not the gateway's, passes untouched.
    Passthrough,
    /// `GET /v1/models` and `/v1/models/{id}`: answered by the filter.
    Models,
    /// `POST /v1/chat/completions`: admitted, forwarded, billed.
    ChatCompletions,
    /// `POST /v1/responses`: admitted, forwarded, billed as chat is.
    Responses,
    /// `POST /v1/embeddings`: admitted, forwarded, billed by its input.
    Embeddings,
    /// A response stored upstream: `GET`/`DELETE /v1/responses/{id}`,
    /// `POST .../cancel`, `GET .../input_items`; passed on (unbilled) to the
    /// key that made it only. `tail` is `""`, `/cancel` or `/input_items`.
    StoredResponse { id: String, tail: &'static str },
    /// A `/v1/` path the gateway does not serve (the bare path, for the error).
    Unknown(String),
    /// A served path with the wrong method.
    WrongMethod { method: String, path: String },
}

pub fn route(method: &str, path: &str) -> Route {
    let bare = path.split('?').next().unwrap_or_default();
    if !bare.starts_with("/v1/") && bare != "/v1" {
        return Route::Passthrough;
    }
    let (wanted, route) = if bare == "/v1/models" || bare.starts_with("/v1/models/") {
        ("GET", Route::Models)
    } else if bare == "/v1/chat/completions" {
        ("POST", Route::ChatCompletions)
    } else if bare == "/v1/responses" {
        ("POST", Route::Responses)
    } else if bare == "/v1/embeddings" {
        ("POST", Route::Embeddings)
    } else if let Some(rest) = bare.strip_prefix("/v1/responses/") {
        let (id, tail) = match rest.split_once('/') {
            None => (rest, ""),
            Some((id, "cancel")) => (id, "/cancel"),
            Some((id, "input_items")) => (id, "/input_items"),
            Some(_) => return Route::Unknown(bare.to_owned()),
        };
        if !bridge_protocol::valid_request_id(id) {
            return Route::Unknown(bare.to_owned());
        }
        let allowed = match tail {
            "" => method == "GET" || method == "DELETE",
            "/cancel" => method == "POST",
            _ => method == "GET",
        };
        if !allowed {
            return Route::WrongMethod { method: method.to_owned(), path: bare.to_owned() };
        }
        return Route::StoredResponse { id: id.to_owned(), tail };
    } else {
        return Route::Unknown(bare.to_owned());
    };
    if method != wanted {
        return Route::WrongMethod { method: method.to_owned(), path: bare.to_owned() };
    }
    route
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_methods_pick_the_route() {
        assert_eq!(route("GET", "/healthz"), Route::Passthrough);
        assert_eq!(route("GET", "/v1x"), Route::Passthrough);
        assert_eq!(route("GET", "/v1/models"), Route::Models);
        assert_eq!(route("GET", "/v1/models/gpt?x=1"), Route::Models);
        assert_eq!(route("POST", "/v1/chat/completions?api-version=1"), Route::ChatCompletions);
        assert_eq!(route("POST", "/v1/responses"), Route::Responses);
        assert_eq!(route("GET", "/v1/responses/resp_1"), Route::StoredResponse { id: "resp_1".into(), tail: "" });
        assert_eq!(route("DELETE", "/v1/responses/resp_1"), Route::StoredResponse { id: "resp_1".into(), tail: "" });
        assert_eq!(route("POST", "/v1/responses/r/cancel"), Route::StoredResponse { id: "r".into(), tail: "/cancel" });
        assert_eq!(
            route("GET", "/v1/responses/r/input_items?limit=2"),
            Route::StoredResponse { id: "r".into(), tail: "/input_items" }
        );
        assert!(matches!(route("POST", "/v1/responses/r"), Route::WrongMethod { .. }));
        assert_eq!(route("GET", "/v1/responses/r/other"), Route::Unknown("/v1/responses/r/other".into()));
        assert_eq!(route("GET", "/v1/responses/a.b"), Route::Unknown("/v1/responses/a.b".into()));
        assert_eq!(route("POST", "/v1/embeddings"), Route::Embeddings);
        assert_eq!(route("POST", "/v1/audio/speech"), Route::Unknown("/v1/audio/speech".into()));
        assert_eq!(route("POST", "/v1"), Route::Unknown("/v1".into()));
        assert_eq!(
            route("GET", "/v1/chat/completions"),
            Route::WrongMethod { method: "GET".into(), path: "/v1/chat/completions".into() }
        );
        assert!(matches!(route("DELETE", "/v1/models"), Route::WrongMethod { .. }));
    }
}

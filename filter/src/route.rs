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
        assert_eq!(route("GET", "/v1/responses/resp_1"), Route::Unknown("/v1/responses/resp_1".into()));
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

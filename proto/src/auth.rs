//! The shared cluster token: clients send `authorization: Bearer <token>`; the services
//! refuse calls without it when a token is configured.

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Environment variable holding the cluster token.
pub const TOKEN_ENV: &str = "TAMING_CLUSTER_TOKEN";

/// Checks incoming calls.
#[derive(Debug, Clone)]
pub struct RequireToken {
    expected: Option<String>,
}

impl RequireToken {
    /// Requires `token` (no check when `None`).
    pub fn new(token: Option<String>) -> Self {
        Self {
            expected: token.map(|t| format!("Bearer {t}")),
        }
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        match request.metadata().get("authorization") {
            Some(v) if v.as_bytes() == expected.as_bytes() => Ok(request),
            Some(_) => Err(Status::unauthenticated("wrong cluster token")),
            None => Err(Status::unauthenticated(
                "missing cluster token (authorization: Bearer ...)",
            )),
        }
    }
}

/// Adds the token to outgoing calls.
#[derive(Debug, Clone)]
pub struct AttachToken {
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl AttachToken {
    /// Attaches `token` (nothing when `None`).
    pub fn new(token: Option<&str>) -> Self {
        Self {
            header: token.and_then(|t| format!("Bearer {t}").parse().ok()),
        }
    }
}

impl Interceptor for AttachToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            request.metadata_mut().insert("authorization", h.clone());
        }
        Ok(request)
    }
}

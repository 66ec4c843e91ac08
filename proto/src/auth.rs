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
            Some(v) if same_bytes(v.as_bytes(), expected.as_bytes()) => Ok(request),
            Some(_) => Err(Status::unauthenticated("wrong cluster token")),
            None => Err(Status::unauthenticated(
                "missing cluster token (authorization: Bearer ...)",
            )),
        }
    }
}

/// Whether `a` and `b` are equal, in time that depends on their lengths only (not on where
/// they first differ), so that a caller cannot guess the token byte by byte from timings.
pub fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The metadata key of a registered worker's session: the secret the coordinator gave it at
/// registration, which its later calls (heartbeats, assignments, reports, the NCCL id) carry
/// so that a worker can act only for itself.
pub const SESSION_HEADER: &str = "taming-worker-secret";

/// Adds the token (and a worker's session) to outgoing calls.
#[derive(Debug, Clone)]
pub struct AttachToken {
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
    session: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl AttachToken {
    /// Attaches `token` (nothing when `None`).
    pub fn new(token: Option<&str>) -> Self {
        Self {
            header: token.and_then(|t| format!("Bearer {t}").parse().ok()),
            session: None,
        }
    }

    /// Also attaches a worker's session (see [`SESSION_HEADER`]).
    pub fn with_session(mut self, session: Option<&str>) -> Self {
        self.session = session.and_then(|s| s.parse().ok());
        self
    }
}

impl Interceptor for AttachToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            request.metadata_mut().insert("authorization", h.clone());
        }
        if let Some(s) = &self.session {
            request.metadata_mut().insert(SESSION_HEADER, s.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(token: Option<&str>, sent: Option<&str>) -> Result<(), tonic::Code> {
        let mut request = Request::new(());
        if let Some(s) = sent {
            request
                .metadata_mut()
                .insert("authorization", s.parse().unwrap());
        }
        RequireToken::new(token.map(str::to_string))
            .call(request)
            .map(drop)
            .map_err(|s| s.code())
    }

    #[test]
    fn only_the_exact_token_passes() {
        assert_eq!(call(Some("s3cret"), Some("Bearer s3cret")), Ok(()));
        for wrong in [
            "Bearer s3cres",
            "Bearer s3cret2",
            "Bearer s3cre",
            "s3cret",
            "",
        ] {
            assert_eq!(
                call(Some("s3cret"), Some(wrong)),
                Err(tonic::Code::Unauthenticated),
                "{wrong:?}"
            );
        }
        assert_eq!(
            call(Some("s3cret"), None),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(call(None, None), Ok(()), "no token configured: no check");
    }

    #[test]
    fn attached_tokens_are_the_ones_required() {
        let mut request = Request::new(());
        request = AttachToken::new(Some("abc")).call(request).unwrap();
        assert!(RequireToken::new(Some("abc".into())).call(request).is_ok());
    }
}

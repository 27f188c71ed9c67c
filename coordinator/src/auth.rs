//! Bearer-token authentication for every RPC when a token is configured.

use subtle::ConstantTimeEq;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Checks `authorization: Bearer <token>` on every request. With no token configured every request
/// passes (a loopback or otherwise trusted network).
#[derive(Clone)]
pub struct BearerAuth {
    expected: Option<Vec<u8>>,
}

impl BearerAuth {
    pub fn new(token: Option<String>) -> BearerAuth {
        BearerAuth {
            expected: token.map(|t| format!("Bearer {t}").into_bytes()),
        }
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        match request.metadata().get("authorization") {
            Some(v) if bool::from(v.as_bytes().ct_eq(expected)) => Ok(request),
            Some(_) => Err(Status::unauthenticated(
                "wrong bearer token: give the agent the coordinator's token (--token-file or DECODEBENCH_TOKEN)",
            )),
            None => Err(Status::unauthenticated(
                "this coordinator requires a bearer token: pass --token-file or set DECODEBENCH_TOKEN",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(auth: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(a) = auth {
            r.metadata_mut().insert("authorization", a.parse().unwrap());
        }
        r
    }

    #[test]
    fn checks_the_token_only_when_configured() {
        let mut open = BearerAuth::new(None);
        assert!(open.call(req(None)).is_ok());
        let mut auth = BearerAuth::new(Some("s3cret".into()));
        assert!(auth.call(req(Some("Bearer s3cret"))).is_ok());
        let e = auth.call(req(Some("Bearer wrong"))).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(auth.call(req(None)).is_err());
        assert!(auth.call(req(Some("Bearer s3cret "))).is_err());
    }
}

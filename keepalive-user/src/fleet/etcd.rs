//! How to reach etcd: endpoints, TLS, auth, the keys under the prefix,
//! and one member per client.
use std::{path::PathBuf, time::Duration};

use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};

use super::DEFAULT_PREFIX;
use crate::{config::EtcdSettings, Error, InvalidInput};

/// How to reach etcd.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdOptions {
    /// `http://HOST:PORT` or `https://HOST:PORT`, one per member.
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// CA certificate (PEM) that signed the members' certificates.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM), for members that ask for one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// etcd user; the password is read from `password_file`.
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
}

impl EtcdOptions {
    /// The client's options from `tcpka fleet`'s or `tcpka serve`'s
    /// settings; `None` without endpoints (then no other setting may be
    /// given).
    pub fn from_settings(s: &EtcdSettings) -> Result<Option<Self>, Error> {
        let usage = |m: String| Error::Invalid(InvalidInput::Usage(m));
        let Some(etcd) = &s.etcd else {
            let set = s.etcd_prefix.is_some()
                || s.etcd_ca.is_some()
                || s.etcd_cert.is_some()
                || s.etcd_user.is_some();
            if set {
                return Err(usage("the --etcd-* options need --etcd URL".into()));
            }
            return Ok(None);
        };
        let endpoints =
            crate::node::parse_etcd_endpoints(etcd).map_err(|e| usage(format!("--etcd: {e}")))?;
        let o = Self {
            endpoints,
            prefix: s
                .etcd_prefix
                .clone()
                .unwrap_or_else(|| DEFAULT_PREFIX.into()),
            ca: s.etcd_ca.clone(),
            cert: s.etcd_cert.clone(),
            key: s.etcd_key.clone(),
            user: s.etcd_user.clone(),
            password_file: s.etcd_password_file.clone(),
        };
        o.check()?;
        Ok(Some(o))
    }

    /// Checks what can be checked before connecting: the prefix, the files
    /// (read here, so that a bad one changes nothing), the pairs.
    pub fn check(&self) -> Result<(), Error> {
        let usage = |m: String| Error::Invalid(InvalidInput::Usage(m));
        if !self.prefix.starts_with('/') || self.prefix.ends_with('/') || self.prefix.len() < 2 {
            return Err(usage(format!(
                "--etcd-prefix {:?}: a key prefix such as /tcpka (a leading /, no trailing /)",
                self.prefix
            )));
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err(usage("--etcd-cert and --etcd-key go together".into()));
        }
        if self.user.is_some() != self.password_file.is_some() {
            return Err(usage(
                "--etcd-user and --etcd-password-file go together".into(),
            ));
        }
        for f in [&self.ca, &self.cert, &self.key, &self.password_file]
            .into_iter()
            .flatten()
        {
            std::fs::metadata(f).map_err(|e| Error::io(format!("reading {}", f.display()), e))?;
        }
        Ok(())
    }

    fn connect_options(&self) -> Result<ConnectOptions, Error> {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| Error::io(format!("reading {}", p.display()), e))
        };
        let mut o = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        if self.ca.is_some() || self.cert.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.ca {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            o = o.with_tls(tls);
        }
        if let (Some(user), Some(file)) = (&self.user, &self.password_file) {
            let password = crate::access::read_password_file(file)?;
            o = o.with_user(user.clone(), password);
        }
        Ok(o)
    }

    /// Connects (and authenticates, when a user is given) to the first
    /// member that answers and has a leader.
    pub async fn connect(&self) -> Result<Client, Error> {
        self.connect_from(0).await.map(|(c, _)| c)
    }

    /// [`EtcdOptions::connect`], trying the members in turn from `first`
    /// (an agent starts where it was last connected); returns which one
    /// answered. One member per client: a request never goes to a member
    /// that has gone away while another answers.
    pub async fn connect_from(&self, first: usize) -> Result<(Client, usize), Error> {
        let options = self.connect_options()?;
        let n = self.endpoints.len();
        let mut why = Vec::new();
        for k in 0..n {
            let i = (first + k) % n;
            let endpoint = &self.endpoints[i];
            let tried = async {
                let mut c = Client::connect([endpoint], Some(options.clone())).await?;
                let status = c.status().await?;
                Ok::<_, etcd_client::Error>((c, status.leader()))
            };
            match tried.await {
                Ok((c, leader)) if leader != 0 => return Ok((c, i)),
                Ok(_) => why.push(format!("{endpoint}: no leader")),
                Err(e) => why.push(format!(
                    "{endpoint}: {}",
                    crate::one_line(&etcd_error("connecting", e))
                )),
            }
        }
        Err(Error::Etcd {
            what: "no etcd member answers".into(),
            why: why.join("; "),
            transient: true,
        })
    }

    pub fn rules_prefix(&self) -> String {
        format!("{}/rules/", self.prefix)
    }

    pub fn rule_key(&self, name: &str) -> String {
        format!("{}/rules/{name}", self.prefix)
    }

    pub fn nodes_prefix(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }

    pub fn node_key(&self, node: &str) -> String {
        format!("{}/nodes/{node}", self.prefix)
    }

    pub fn known_prefix(&self) -> String {
        format!("{}/known/", self.prefix)
    }

    pub fn known_key(&self, node: &str) -> String {
        format!("{}/known/{node}", self.prefix)
    }
}

/// An etcd failure, in one line, and whether it may pass (see
/// [`Error::Etcd`]).
pub fn etcd_error(what: &str, e: etcd_client::Error) -> Error {
    use etcd_client::Error as E;
    let (why, transient) = match &e {
        E::GRpcStatus(s) => {
            let why = if s.message().is_empty() {
                format!("{:?}", s.code())
            } else {
                format!("{} ({:?})", s.message(), s.code())
            };
            let message = s.message();
            let transient = matches!(
                s.code(),
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Cancelled
                    | tonic::Code::Aborted
                    | tonic::Code::Unknown
            ) || message.contains("leader")
                || message.contains("timed out")
                || message.contains("too many requests");
            (why, transient)
        }
        E::TransportError(_) | E::IoError(_) => (e.to_string(), true),
        other => (other.to_string(), false),
    };
    Error::Etcd {
        what: what.to_owned(),
        why,
        transient,
    }
}

impl Error {
    /// Whether etcd may answer if asked again (another member, or later).
    pub fn is_transient_etcd(&self) -> bool {
        matches!(
            self,
            Error::Etcd {
                transient: true,
                ..
            }
        )
    }
}

/// Pages of a full read: at most this many keys per response, so that a
/// prefix of any size is read in responses of bounded size (a rule's value
/// is a few hundred bytes; etcd takes values up to 1.5 MiB).
const PAGE: i64 = 500;

/// The end of the key range of `prefix`: every key that starts with it is
/// below.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Every key under `prefix` (the part after it) and its value, read in
/// pages at one revision; and that revision. A page past the client's
/// message limit (4 MiB: large values) is asked again smaller.
pub async fn read_prefix(
    client: &mut Client,
    prefix: &str,
    what: &str,
) -> Result<(Vec<(String, Vec<u8>)>, i64), Error> {
    let end = prefix_end(prefix);
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0;
    let mut out = Vec::new();
    let mut limit = PAGE;
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(limit);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let page = match client.get(from.clone(), Some(options)).await {
            Ok(p) => p,
            Err(etcd_client::Error::GRpcStatus(s))
                if s.code() == tonic::Code::OutOfRange && limit > 1 =>
            {
                limit = (limit / 8).max(1);
                continue;
            }
            Err(e) => return Err(etcd_error(what, e)),
        };
        if revision == 0 {
            revision = page.header().map_or(0, |h| h.revision());
        }
        for kv in page.kvs() {
            if let Some(name) = kv.key_str().ok().and_then(|k| k.strip_prefix(prefix)) {
                out.push((name.to_owned(), kv.value().to_vec()));
            }
        }
        match page.kvs().last() {
            Some(last) if page.more() => {
                from = last.key().to_vec();
                from.push(0);
                limit = (limit * 2).min(PAGE);
            }
            _ => return Ok((out, revision)),
        }
    }
}

/// How long `tcpka fleet` keeps trying while etcd cannot answer (a leader
/// election, a member gone).
pub const RETRY_FOR: Duration = Duration::from_secs(15);

impl EtcdOptions {
    /// Runs `op` on a client of one member; while etcd cannot answer
    /// ([`Error::is_transient_etcd`]), runs it again on the next member,
    /// with a growing pause, for up to `within`. The error names the last
    /// cause and how long it was tried.
    pub async fn retrying<T, F>(&self, within: Duration, mut op: F) -> Result<T, Error>
    where
        F: for<'c> FnMut(
            &'c mut Client,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, Error>> + Send + 'c>,
        >,
    {
        let started = std::time::Instant::now();
        let mut member = 0;
        let mut pause = Duration::from_millis(100);
        loop {
            let last = match self.connect_from(member).await {
                Ok((mut client, m)) => {
                    member = m;
                    match op(&mut client).await {
                        Err(e) if e.is_transient_etcd() => e,
                        done => return done,
                    }
                }
                Err(e) if e.is_transient_etcd() => e,
                Err(e) => return Err(e),
            };
            member += 1;
            if started.elapsed() + pause > within {
                return Err(match last {
                    Error::Etcd { what, why, .. } => Error::Etcd {
                        what,
                        why: format!(
                            "{why} (etcd did not answer for {} s)",
                            started.elapsed().as_secs()
                        ),
                        transient: true,
                    },
                    other => other,
                });
            }
            tokio::time::sleep(crate::jitter(pause)).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_range_ends_past_its_last_key() {
        assert_eq!(prefix_end("/tcpka/rules/"), b"/tcpka/rules0");
        assert_eq!(prefix_end("a\u{7f}"), [b'a', 0x80]);
        let transient = etcd_error(
            "x",
            etcd_client::Error::GRpcStatus(tonic::Status::unavailable("no leader")),
        );
        assert!(transient.is_transient_etcd());
        let refused = etcd_error(
            "x",
            etcd_client::Error::GRpcStatus(tonic::Status::invalid_argument(
                "authentication failed",
            )),
        );
        assert!(!refused.is_transient_etcd());
        assert_eq!(
            refused.to_string(),
            "x: authentication failed (InvalidArgument)"
        );
    }
}

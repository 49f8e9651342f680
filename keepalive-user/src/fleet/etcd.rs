//! How to reach etcd: endpoints, TLS, auth, the keys under the prefix,
//! and one member per client.
use super::*;

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
        Err(Error::Io {
            what: format!("no etcd member answers ({})", why.join("; ")),
            source: std::io::ErrorKind::NotConnected.into(),
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

/// An etcd failure, in one line.
pub fn etcd_error(what: &str, e: etcd_client::Error) -> Error {
    let why = match &e {
        etcd_client::Error::GRpcStatus(s) if !s.message().is_empty() => {
            format!("{} ({:?})", s.message(), s.code())
        }
        other => other.to_string(),
    };
    Error::Io {
        what: format!("{what}: {why}"),
        source: std::io::ErrorKind::Other.into(),
    }
}

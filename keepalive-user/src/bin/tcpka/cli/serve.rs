//! `tcpka serve`: the daemon's options (the command line over the
//! configuration file's `[serve]`, one type: `tcpka::config::ServeOptions`),
//! then the server.
use std::path::{Path, PathBuf};

use tcpka::{
    config::{Listen, ServeOptions},
    paths::PinLayout,
    server, Error,
};

use super::{load::target_cgroup, output::runtime};

pub(crate) fn serve(layout: PinLayout, options: ServeOptions) -> Result<(), Error> {
    // The configuration file's [serve] settings, under the options
    // given here: merged once, then read.
    let file = match &options.config {
        Some(path) => tcpka::config::Config::load(path)?.serve,
        None => ServeOptions::default(),
    };
    let o = options.over(&file);
    let cgroup = target_cgroup(&layout, o.cgroup.as_deref())?;
    let api_group = o
        .api_group
        .as_deref()
        .map(tcpka::access::group_id)
        .transpose()?;
    let listen = match &o.listen {
        Some(l) => l.clone(),
        None => server::DEFAULT_LISTEN
            .parse::<Listen>()
            .map_err(|e| Error::Invalid(tcpka::InvalidInput::Listen(e)))?,
    };
    let usage = |m: String| Error::Invalid(tcpka::InvalidInput::Usage(m));
    if o.webhook.is_none() && (o.webhook_secret_file.is_some() || o.webhook_ca.is_some()) {
        return Err(usage(
            "a webhook secret or CA file needs a webhook (--webhook URL)".into(),
        ));
    }
    if o.webhook.is_none() && o.evapi.is_none() && o.events_token_file.is_some() {
        return Err(usage(
            "an events token file needs a receiver (--webhook URL or --evapi HOST:PORT)".into(),
        ));
    }
    if let (Some(url), Some(_)) = (&o.webhook, &o.events_token_file) {
        if !server::webhook_keeps_secrets(url) {
            return Err(usage(format!(
                "--events-token-file sends the token in clear: the webhook must be \
                 https:// or on a loopback address, not {url}"
            )));
        }
    }
    // Files are read before the token is made: a bad one changes nothing.
    let events_token = o
        .events_token_file
        .as_deref()
        .map(tcpka::access::read_token_file)
        .transpose()?;
    let webhook = webhook_config(&o, &events_token)?;
    let evapi = evapi_config(&o, &events_token)?;
    let fleet = fleet_config(&layout, &o)?;
    let mut token_write = None;
    let token = serve_token(
        &layout,
        &listen,
        o.token.clone(),
        o.token_file.as_deref(),
        &mut token_write,
    )?;
    let config = server::Config {
        listen,
        token,
        token_file: token_write,
        api_group,
        load: o.kernel.load_options(),
        webhook,
        evapi,
        json: o.json.unwrap_or(false),
        rules_file: o.config.clone(),
        kernel_log: o.kernel_log,
        fleet,
    };
    runtime()?.block_on(server::run(layout, cgroup, config))?;
    Ok(())
}

/// The webhook, with its secret and CA read.
fn webhook_config(
    o: &ServeOptions,
    events_token: &Option<String>,
) -> Result<Option<server::WebhookConfig>, Error> {
    let Some(url) = &o.webhook else {
        return Ok(None);
    };
    Ok(Some(server::WebhookConfig {
        url: url.clone(),
        secret: o
            .webhook_secret_file
            .as_deref()
            .map(tcpka::access::read_token_file)
            .transpose()?,
        bearer: events_token.clone(),
        ca_pem: o
            .webhook_ca
            .as_deref()
            .map(|p| std::fs::read(p).map_err(|e| Error::io(format!("reading {}", p.display()), e)))
            .transpose()?,
    }))
}

/// Kamailio's evapi: its address, the users its socket may belong to, the
/// kinds of event sent.
fn evapi_config(
    o: &ServeOptions,
    events_token: &Option<String>,
) -> Result<Option<tcpka::evapi::EvapiConfig>, Error> {
    let usage = |m: String| Error::Invalid(tcpka::InvalidInput::Usage(m));
    let Some(addr) = o.evapi else {
        if o.evapi_user.is_some() {
            return Err(usage("--evapi-user needs --evapi HOST:PORT".into()));
        }
        if o.evapi_events.is_some() {
            return Err(usage("--evapi-events needs --evapi HOST:PORT".into()));
        }
        return Ok(None);
    };
    // Without --evapi-user: Kamailio's usual user, if this host has one
    // (root is always accepted).
    let users = match &o.evapi_user {
        Some(user) => vec![tcpka::access::uid_of(user)
            .ok_or_else(|| usage(format!("--evapi-user: no such user {user:?}")))?],
        None => tcpka::access::uid_of("kamailio").into_iter().collect(),
    };
    Ok(Some(tcpka::evapi::EvapiConfig {
        addr,
        token: events_token.clone(),
        users,
        events: o.evapi_kinds(),
    }))
}

/// The fleet agent's settings, when serve joins a fleet.
fn fleet_config(
    layout: &PinLayout,
    o: &ServeOptions,
) -> Result<Option<tcpka::fleet::AgentConfig>, Error> {
    let Some(etcd) = tcpka::fleet::EtcdOptions::from_settings(&o.etcd)? else {
        if o.node.is_some() || !o.labels.is_empty() || o.etcd_cache.is_some() {
            return Err(Error::Invalid(tcpka::InvalidInput::Usage(
                "--node, --label and --etcd-cache need --etcd URL".into(),
            )));
        }
        return Ok(None);
    };
    Ok(Some(tcpka::fleet::AgentConfig {
        etcd,
        node: o.node.clone().unwrap_or_else(tcpka::fleet::default_node),
        labels: o.label_map(),
        cache: o
            .etcd_cache
            .clone()
            .unwrap_or_else(|| layout.fleet_cache_file()),
    }))
}

/// The API token: from --token-file, --token or TCPKA_TOKEN; for a TCP
/// listener without one, a new token, for serve to write to the
/// installation's token file (`write_to`: /run/tcpka/api-token for the
/// default installation).
pub(crate) fn serve_token(
    layout: &PinLayout,
    listen: &Listen,
    token: Option<String>,
    file: Option<&Path>,
    write_to: &mut Option<PathBuf>,
) -> Result<Option<String>, Error> {
    let token = match (token, file) {
        (_, Some(f)) => Some(tcpka::access::read_token_file(f)?),
        (Some(t), None) => {
            tcpka::access::check_token(&t)
                .map_err(|why| Error::Invalid(tcpka::InvalidInput::Listen(why.into())))?;
            Some(t)
        }
        (None, None) => None,
    };
    if token.is_some() || !matches!(listen, Listen::Tcp(_)) {
        return Ok(token);
    }
    // Written once serve holds the installation and has loaded: a serve
    // that cannot start leaves the running one's token alone.
    let t = tcpka::access::generate_token()?;
    *write_to = Some(layout.token_file());
    Ok(Some(t))
}

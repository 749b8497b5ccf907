//! A real etcd server (Debian `etcd-server`) on free loopback ports with its own data dir, and
//! a TCP relay in front of it that can cut the connection to play an outage the test controls.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, PutOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::unused_port;

pub struct Etcd {
    pub client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Set: etcd serves https and requires a client certificate signed by the test CA.
    tls: Option<Certs>,
}

/// A throw-away CA, a server certificate for 127.0.0.1, and a client certificate, made with
/// the `openssl` command.
#[derive(Clone)]
pub struct Certs {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Certs {
    pub fn generate(dir: &std::path::Path) -> Certs {
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        // clientAuth too: etcd's gRPC gateway dials etcd itself with the server certificate.
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
        )
        .unwrap();
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=sluice-test-ca",
        ]);
        openssl(&ca);
        for (name, ext) in [("server", "server.ext"), ("client", "client.ext")] {
            let (key, csr, pem) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
            );
            let mut req = vec!["req"];
            req.extend(ec);
            req.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=127.0.0.1"]);
            openssl(&req);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                ext,
            ]);
        }
        Certs {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        }
    }

    /// Client options that trust the test CA and present the client certificate.
    pub fn client_options(&self) -> etcd_client::ConnectOptions {
        let read = |p: &PathBuf| std::fs::read(p).expect("read cert");
        let tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&self.ca)))
            .identity(etcd_client::Identity::from_pem(
                read(&self.client_cert),
                read(&self.client_key),
            ));
        etcd_client::ConnectOptions::new().with_tls(tls)
    }
}

impl Etcd {
    /// Starts etcd and returns once it answers.
    pub async fn start() -> Etcd {
        Etcd::start_with(None).await
    }

    /// Starts etcd on https, requiring client certificates from `certs`' CA.
    pub async fn start_tls(certs: Certs) -> Etcd {
        Etcd::start_with(Some(certs)).await
    }

    async fn start_with(tls: Option<Certs>) -> Etcd {
        let mut etcd = Etcd {
            client_port: unused_port(),
            peer_port: unused_port(),
            dir: tempfile::tempdir().expect("etcd tempdir"),
            child: None,
            tls,
        };
        // The ports come from `unused_port`, which another process may take first: then etcd
        // exits, and it starts again on new ones (at most three times).
        for _ in 0..2 {
            match etcd.try_launch().await {
                Ok(()) => return etcd,
                Err(log) if log.contains("address already in use") => {
                    etcd.client_port = unused_port();
                    etcd.peer_port = unused_port();
                }
                Err(log) => panic!("etcd exited:\n{log}"),
            }
        }
        etcd.launch().await;
        etcd
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    fn options(&self) -> Option<etcd_client::ConnectOptions> {
        self.tls.as_ref().map(Certs::client_options)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    async fn launch(&mut self) {
        if let Err(log) = self.try_launch().await {
            panic!("etcd exited:\n{log}");
        }
    }

    /// Starts etcd and waits until it answers; `Err` with its log when it exited instead.
    async fn try_launch(&mut self) -> Result<(), String> {
        let client = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.log_path()).expect("etcd log");
        let mut command = Command::new("etcd");
        if let Some(certs) = &self.tls {
            command
                .arg(format!("--cert-file={}", certs.server_cert.display()))
                .arg(format!("--key-file={}", certs.server_key.display()))
                .arg(format!("--trusted-ca-file={}", certs.ca.display()))
                .arg("--client-cert-auth");
        }
        let child = command
            .arg("--name=test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .arg("--logger=zap")
            .arg("--log-level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd (Debian package etcd-server; scripts/setup installs it)");
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Ok(mut client)) = tokio::time::timeout(
                Duration::from_secs(2),
                Client::connect([self.url()], self.options()),
            )
            .await
            {
                if let Ok(Ok(_)) =
                    tokio::time::timeout(Duration::from_secs(2), client.status()).await
                {
                    return Ok(());
                }
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Err(format!("({status})\n{}", self.log()));
            }
            assert!(Instant::now() < end, "etcd not up in 30 s:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGKILL: an outage as abrupt as they come.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same ports and data.
    pub async fn restart(&mut self) {
        self.stop();
        self.launch().await;
    }

    pub async fn client(&self) -> Client {
        Client::connect([self.url()], self.options())
            .await
            .expect("etcd client")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- etcd log ---\n{}", self.log());
        }
    }
}

/// Puts `key = value` under a new lease of `ttl` seconds; returns the lease.
pub async fn put_leased(client: &mut Client, key: &str, value: &str, ttl: i64) -> i64 {
    let lease = client.lease_grant(ttl, None).await.expect("lease").id();
    client
        .put(key, value, Some(PutOptions::new().with_lease(lease)))
        .await
        .expect("put");
    lease
}

/// What Go's `endpoints.Manager` writes for `addr`.
pub fn naming_value(addr: SocketAddr, metadata: &str) -> String {
    format!(r#"{{"Op":0,"Addr":"{addr}","Metadata":{metadata}}}"#)
}

/// The keys under `prefix`, as strings.
pub async fn keys(client: &mut Client, prefix: &str) -> Vec<String> {
    client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .expect("get")
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
}

/// Config for an `etcd:` block and one etcd-discovered cluster named `echo`.
pub fn etcd_cluster(etcd_url: &str, prefix: &str, format: &str, extra: &str) -> String {
    format!(
        "etcd:\n  endpoints: [\"{etcd_url}\"]\n  dial_timeout: 1s\n\
         clusters:\n  - name: echo\n    discovery:\n      etcd: {{ prefix: \"{prefix}\", format: {format} }}\n{extra}"
    )
}

/// A loopback TCP relay to `target`. `cut` closes every relayed connection and refuses (accepts
/// and closes) new ones until `restore`: an etcd outage that only sluice sees, while the test
/// still reaches etcd directly.
pub struct Relay {
    pub addr: SocketAddr,
    /// `true` while connections may pass. Every change closes the open ones.
    open: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let open = watch::Sender::new(true);
        let state = open.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut downstream, _)) = listener.accept().await {
                if !*state.borrow() {
                    drop(downstream);
                    continue;
                }
                let mut changed = state.subscribe();
                tokio::spawn(async move {
                    let Ok(mut upstream) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream) => {}
                        _ = changed.changed() => {}
                    }
                });
            }
        });
        Relay { addr, open, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    pub fn restore(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

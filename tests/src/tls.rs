//! Certificates for the tests' TLS peers, made with openssl: a CA, a
//! server certificate for 127.0.0.1, and a client certificate (CN root).
use super::*;

/// The files [`Certs::make`] writes.
pub struct Certs {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Certs {
    /// Makes them in `dir` (created), valid for a day.
    pub fn make(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let p = |f: &str| dir.join(f).to_str().unwrap().to_owned();
        let openssl = |args: &[&str]| sh(&[&["openssl"], args].concat());
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let (ca, ca_key) = (p("ca.pem"), p("ca.key"));
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    &ca_key,
                    "-out",
                    &ca,
                    "-days",
                    "1",
                    "-subj",
                    "/CN=tcpka test CA",
                ],
            ]
            .concat(),
        );
        for (who, cn, ext) in [
            (
                "server",
                "127.0.0.1",
                "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
            ),
            (
                "client",
                "root",
                "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
            ),
        ] {
            let (key, csr, pem, extfile) = (
                p(&format!("{who}.key")),
                p(&format!("{who}.csr")),
                p(&format!("{who}.pem")),
                p(&format!("{who}.ext")),
            );
            std::fs::write(&extfile, ext).unwrap();
            openssl(
                &[
                    &["req"][..],
                    &ec,
                    &["-keyout", &key, "-out", &csr, "-subj", &format!("/CN={cn}")],
                ]
                .concat(),
            );
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "1",
                "-extfile",
                &extfile,
            ]);
        }
        Self {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        }
    }
}

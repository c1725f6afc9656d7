//! A throwaway PostgreSQL server for integration tests: initdb in a
//! temporary directory under target/, password (SCRAM) authentication, a
//! free loopback port, stopped by pid when dropped.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running test server.
pub struct TestPg {
    /// Data directory (removed on drop).
    pub dir: PathBuf,
    /// Loopback port.
    pub port: u16,
    /// Superuser name.
    pub user: String,
    /// Superuser password.
    pub password: String,
    /// PEM of the CA that signed the server certificate (TLS servers only).
    pub ca_pem: Option<String>,
    tls: bool,
    child: Child,
}

/// Starts the postmaster of the server in `dir` on `port`.
fn launch(dir: &std::path::Path, port: u16, tls: bool) -> Child {
    let data = dir.join("data");
    as_pg(bin("postgres"))
        .arg("-D")
        .arg(&data)
        .args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            &format!("port={port}"),
            "-c",
            "fsync=off",
        ])
        .arg("-c")
        .arg(format!("unix_socket_directories={}", data.display()))
        .args(["-c", "max_connections=300"])
        .args(if tls {
            vec![
                "-c".to_string(),
                "ssl=on".to_string(),
                "-c".to_string(),
                format!("ssl_cert_file={}", dir.join("server.crt").display()),
                "-c".to_string(),
                format!("ssl_key_file={}", dir.join("server.key").display()),
            ]
        } else {
            Vec::new()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start postgres")
}

/// Runs openssl; panics with its stderr when it fails.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`<prefix>ca.crt`) in `dir`; with `server`, also a server
/// certificate for localhost and 127.0.0.1 it signed.
pub fn make_certs(dir: &std::path::Path, prefix: &str, server: bool) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let (ca_key, ca_crt) = (format!("{prefix}ca.key"), format!("{prefix}ca.crt"));
    let mut args = vec![
        "req",
        "-x509",
        "-days",
        "2",
        "-subj",
        "/CN=shardpool test CA",
    ];
    args.extend(ec);
    args.extend(["-keyout", &ca_key, "-out", &ca_crt]);
    args.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
    args.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    openssl(dir, &args);
    if !server {
        return;
    }
    let mut args = vec!["req", "-subj", "/CN=localhost"];
    args.extend(ec);
    args.extend(["-keyout", "server.key", "-out", "server.csr"]);
    openssl(dir, &args);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write server.ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "server.crt",
            "-extfile",
            "server.ext",
        ],
    );
    // PostgreSQL refuses a key others can read.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod server.key");
}

fn bin(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.pop()
        .map(|d| d.join(name))
        .unwrap_or_else(|| PathBuf::from(name))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

fn as_pg(program: PathBuf) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl TestPg {
    /// Starts a server; panics with a clear message when it cannot.
    pub fn start(name: &str) -> TestPg {
        Self::start_with(name, false)
    }

    /// Starts a server that offers TLS (ssl=on, a certificate for localhost
    /// and 127.0.0.1 signed by a CA made for the test, in `ca_pem`).
    pub fn start_tls(name: &str) -> TestPg {
        Self::start_with(name, true)
    }

    fn start_with(name: &str, tls: bool) -> TestPg {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("pg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create test pg dir");
        let password = "test-password-Zq7".to_string();
        let pwfile = dir.join("pw");
        std::fs::write(&pwfile, &password).expect("write pwfile");
        let ca_pem = tls.then(|| {
            make_certs(&dir, "", true);
            std::fs::read_to_string(dir.join("ca.crt")).expect("read ca.crt")
        });
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(&dir)
                .status()
                .map(|s| s.success());
            assert_eq!(ok.ok(), Some(true), "chown of the test pg dir failed");
        }
        let data = dir.join("data");
        let out = as_pg(bin("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "tester",
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .expect("run initdb (is the PostgreSQL server package installed?)");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("addr").port()
        };
        let child = launch(&dir, port, tls);
        let pg = TestPg {
            dir,
            port,
            user: "tester".into(),
            password,
            ca_pem,
            tls,
            child,
        };
        pg.wait_ready();
        pg
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(bin("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "test postgres did not become ready in 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Fast shutdown (SIGINT to the postmaster, by pid), waiting until it
    /// has exited: every backend ends with 57P01, new connections are refused.
    pub fn stop(&mut self) {
        // The postmaster's own pid (runuser, our child, runs it as a child).
        let pid = std::fs::read_to_string(self.dir.join("data").join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
            .unwrap_or_else(|| self.child.id().to_string());
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("test postgres did not stop within 10 s");
    }

    /// Starts the stopped server again on the same port and data, without
    /// waiting for it to accept connections.
    pub fn start_again(&mut self) {
        self.child = launch(&self.dir, self.port, self.tls);
    }

    /// Waits until the server accepts connections.
    pub fn ready(&self) {
        self.wait_ready();
    }

    /// Puts `line` first in pg_hba.conf and reloads the configuration.
    pub fn hba_first(&self, line: &str) {
        let path = self.dir.join("data").join("pg_hba.conf");
        let old = std::fs::read_to_string(&path).expect("read pg_hba.conf");
        std::fs::write(&path, format!("{line}\n{old}")).expect("write pg_hba.conf");
        assert_eq!(self.psql("postgres", "SELECT pg_reload_conf()"), "t");
        // The postmaster rereads the file on SIGHUP, asynchronously.
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Runs SQL as the superuser through psql; returns trimmed output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .args([
                "-X",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                &self.user,
                "-d",
                db,
                "-c",
                sql,
            ])
            .env("PGPASSWORD", &self.password)
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for TestPg {
    fn drop(&mut self) {
        // Fast shutdown by pid: SIGINT to the postmaster (runuser forwards it).
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The postmaster itself (child of runuser) writes its pid here.
        if let Ok(s) = std::fs::read_to_string(self.dir.join("data").join("postmaster.pid")) {
            if let Some(pm) = s.lines().next() {
                let _ = Command::new("kill").args(["-KILL", pm.trim()]).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

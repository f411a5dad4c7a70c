//! A private PostgreSQL cluster for a test: `initdb` in a temp dir, the
//! server on a free loopback port with a random password (SCRAM), one
//! database; stopped on drop. Uses the server `scripts/vtn.sh install`
//! installs (the distribution's `postgresql` package). As root, the server
//! runs as the `postgres` account, which initdb requires.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::bench::temp_dir;
use crate::free_port;

/// A running cluster.
pub struct PgCluster {
    bin: PathBuf,
    dir: PathBuf,
    /// Loopback port.
    pub port: u16,
    /// The `gridproxy` role's password.
    pub password: String,
    /// The database created for the test.
    pub db: String,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `cmd` as the `postgres` account when root.
fn as_db(bin: &Path, args: &[&str]) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin).args(args);
        c
    } else {
        let mut c = Command::new(bin);
        c.args(args);
        c
    }
}

fn check(what: &str, o: std::io::Result<Output>) -> Output {
    let o = o.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        o.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// The newest installed server's bin folder.
pub fn pg_bin() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (scripts/vtn.sh install installs it)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    dirs.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop()
        .expect("no initdb under /usr/lib/postgresql/*/bin (scripts/vtn.sh install)")
}

impl PgCluster {
    /// Start a fresh cluster with database `db`.
    pub fn start(name: &str, db: &str) -> PgCluster {
        let bin = pg_bin();
        let dir = temp_dir(&format!("pg-{name}"));
        let password = format!("{:032x}", rand_u128());
        let pw = dir.join("pw");
        std::fs::write(&pw, &password).expect("write pwfile");
        if is_root() {
            check(
                "chown",
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&dir)
                    .output(),
            );
        }
        let data = dir.join("data");
        check(
            "initdb",
            as_db(
                &bin.join("initdb"),
                &[
                    "-D",
                    data.to_str().expect("utf-8 path"),
                    "-U",
                    "gridproxy",
                    &format!("--pwfile={}", pw.display()),
                    "--auth=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--no-locale",
                ],
            )
            .output(),
        );
        let _ = std::fs::remove_file(&pw);
        let port = free_port();
        // A test cluster: durability is the ledger's business, not this
        // server's, so no fsync here.
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             fsync = off\nfull_page_writes = off\n",
            dir.display()
        );
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .expect("postgresql.conf");
        std::io::Write::write_all(&mut f, conf.as_bytes()).expect("append conf");
        let c = PgCluster {
            bin,
            dir,
            port,
            password,
            db: db.to_owned(),
        };
        c.pg_ctl("start");
        c.psql("postgres", &format!("CREATE DATABASE {db}"))
            .expect("CREATE DATABASE");
        c
    }

    fn pg_ctl(&self, what: &str) {
        let data = self.dir.join("data");
        let log = self.dir.join("postgres.log");
        let mut args = vec![
            "-D",
            data.to_str().expect("utf-8"),
            "-l",
            log.to_str().expect("utf-8"),
            "-w",
            "-t",
            "60",
        ];
        if what != "start" {
            args.extend(["-m", "fast"]);
        }
        args.push(what);
        check(
            &format!("pg_ctl {what}"),
            as_db(&self.bin.join("pg_ctl"), &args).output(),
        );
    }

    /// Stop and start the server again (connections drop).
    pub fn restart(&self) {
        self.pg_ctl("restart");
    }

    /// The ledger URL (no password in it).
    pub fn url(&self) -> String {
        format!("postgres://gridproxy@127.0.0.1:{}/{}", self.port, self.db)
    }

    /// Run `sql` with psql against `db`; Err(stderr) if it fails.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let o = Command::new(self.bin.join("psql"))
            .args(["-qAtX", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U"])
            .arg("gridproxy")
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(db)
            .arg("-c")
            .arg(sql)
            .env("PGPASSWORD", &self.password)
            .output()
            .map_err(|e| e.to_string())?;
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&o.stderr).into_owned())
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = as_db(
            &self.bin.join("pg_ctl"),
            &["-D", data.to_str().unwrap_or(""), "-m", "immediate", "stop"],
        )
        .output();
        if std::env::var_os("GRIDPROXY_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Random enough for a throwaway password (the clock and the pid through a
/// hash; the cluster listens on loopback only).
fn rand_u128() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let mut a = std::collections::hash_map::RandomState::new().build_hasher();
    a.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    let hi = a.finish();
    let mut b = std::collections::hash_map::RandomState::new().build_hasher();
    b.write_u32(std::process::id());
    (u128::from(hi) << 64) | u128::from(b.finish())
}

//! The router's startup phase (SSLRequest, StartupMessage, SASL exchange,
//! CancelRequest) fed arbitrary client bytes: it must end with a Handshake
//! or an error, never panic, never hang past its timeout.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use shardpool::router::pgwire::startup::{self, Limits};
use shardpool::router::pgwire::users::Users;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    })
}

fn users() -> &'static Users {
    static USERS: OnceLock<Users> = OnceLock::new();
    USERS.get_or_init(|| Users::parse("bi:fuzz-password:tenants\nops:other:*").expect("users"))
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        startup_timeout: Duration::from_secs(5),
        max_message: 64 * 1024,
    };
    runtime().block_on(async {
        // The client's bytes, then end of stream; whatever the router
        // answers goes to a sink.
        let mut stream = tokio::io::join(std::io::Cursor::new(data.to_vec()), tokio::io::sink());
        let _ = startup::handshake(&mut stream, users(), &limits).await;
    });
});

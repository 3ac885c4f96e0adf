//! Credentials never reach logs or errors, and TLS URIs go through the drivers' own TLS.

use syncbridge::stores;

fn closed_port() -> u16 {
    // Bound then dropped: nothing listens there.
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn connection_errors_do_not_reveal_passwords() {
    let port = closed_port();
    let uris = [
        format!("postgres://app:hunter2@127.0.0.1:{port}/db"),
        format!("redis://:hunter2@127.0.0.1:{port}/0"),
        format!("rediss://user:hunter2@127.0.0.1:{port}/0"),
        format!("postgres://app:hunter2@127.0.0.1:{port}/db?sslmode=require"),
    ];
    // Concurrently: a refused PostgreSQL connection is retried until the pool's timeout.
    let results = futures::future::join_all(uris.iter().map(|u| stores::open(u, "test"))).await;
    for (uri, result) in uris.iter().zip(results) {
        let err = match result {
            Ok(_) => panic!("{} should not connect", stores::redact_uri(uri)),
            Err(e) => format!("{e:#} {e:?}"),
        };
        assert!(!err.contains("hunter2"), "password leaked: {err}");
        assert!(
            err.contains("***") || err.contains("127.0.0.1"),
            "error names the store: {err}"
        );
    }
}

#[tokio::test]
async fn tls_is_negotiated_by_the_drivers() {
    // The test PostgreSQL has no TLS: requiring it must fail with the driver's TLS error, which
    // shows the TLS path is built in (without the feature, sqlx refuses the option itself).
    let Ok(pg) = std::env::var("SYNCBRIDGE_TEST_PG_URL") else {
        panic!("SYNCBRIDGE_TEST_PG_URL is not set: run scripts/test.sh");
    };
    let sep = if pg.contains('?') { '&' } else { '?' };
    let err = match stores::open(&format!("{pg}{sep}sslmode=require"), "test").await {
        Ok(_) => panic!("the test server has no TLS, yet sslmode=require connected"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.to_lowercase().contains("tls") || err.to_lowercase().contains("ssl"),
        "{err}"
    );
}

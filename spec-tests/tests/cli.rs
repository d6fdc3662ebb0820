//! The command line: exit codes (0 ok, 1 error, 2 usage) and messages that
//! say what was wrong and what to do.

use std::path::Path;

use spec_tests::server::{DaemonProcess, free_port, run_cli};

fn example_config() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/mta.example.toml")
        .display()
        .to_string()
}

#[test]
fn config_check_accepts_the_design_example() {
    let (code, out, err) = run_cli(&["config", "check", &example_config()], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.trim_end().ends_with(": ok"), "{out}");
}

#[test]
fn config_check_names_the_file_and_line_of_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "hostname = \"x\"\n[smtp]\nmax_recipients = 10\nrelay_networks = [\"10.1.2.3/40\"]\n",
    )
    .unwrap();
    let (code, _, err) = run_cli(&["config", "check", path.to_str().unwrap()], None);
    assert_eq!(code, 1);
    assert!(err.starts_with(&format!("{}:4:", path.display())), "{err}");

    let (code, _, err) = run_cli(&["config", "check", "/no/such/mta.toml"], None);
    assert_eq!(code, 1);
    assert!(
        err.contains("/no/such/mta.toml") && err.contains("cannot read"),
        "{err}"
    );
}

#[test]
fn user_hash_prints_a_config_line_that_verifies() {
    let (code, out, err) = run_cli(&["user", "hash"], Some("correct horse battery staple\n"));
    assert_eq!(code, 0, "{err}");
    let line = out.trim();
    assert!(line.starts_with("password_hash = \"$argon2id$"), "{line}");
    let text = format!(
        "[[tenants]]\nname = \"t\"\nsender_domains = [\"t.example\"]\n[[tenants.users]]\nname = \"u\"\n{line}\n"
    );
    let config = mta::config::Config::parse(&text, Path::new("t.toml")).unwrap();
    let users = mta::auth::Users::from_config(&config.tenants);
    assert!(users.verify("u", "correct horse battery staple").is_some());
    assert!(users.verify("u", "correct horse battery stapl").is_none());
    assert!(!out.contains("correct horse"), "the password was echoed");

    let (code, _, err) = run_cli(&["user", "hash"], Some(""));
    assert_eq!(code, 1);
    assert!(err.contains("no password on standard input"), "{err}");
}

#[test]
fn usage_errors_exit_2() {
    let (code, _, err) = run_cli(&["queue", "hold"], None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("<ID>"), "{err}");
    let (code, _, _) = run_cli(&["frobnicate"], None);
    assert_eq!(code, 2);
    // Without a daemon, the online queue commands say how to get one (or
    // read the store offline): an error, not a usage error.
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run_cli(
        &["queue", "list", "--data-dir", dir.path().to_str().unwrap()],
        None,
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no daemon at") && err.contains("--offline"),
        "{err}"
    );
}

#[test]
fn serve_refuses_a_bad_config_and_a_busy_port_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[smtp]\nlisten = [\"127.0.0.1:2525\"]\nmax_conections = 5\n",
    )
    .unwrap();
    let (code, _, err) = run_cli(&["serve", "--config", bad.to_str().unwrap()], None);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("{}:3:", bad.display())) && err.contains("max_conections"),
        "{err}"
    );

    let busy = std::net::TcpListener::bind(("127.0.0.1", free_port())).unwrap();
    let port = busy.local_addr().unwrap().port();
    let cfg = dir.path().join("busy.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"{}\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let (code, _, err) = run_cli(&["serve", "--config", cfg.to_str().unwrap()], None);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}"))
            && err.contains("another program"),
        "{err}"
    );
}

#[test]
fn offline_queue_commands_show_and_summarize() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonProcess::start(dir.path(), "");
    let mut c = spec_tests::client::Client::connect(d.addr);
    c.ehlo();
    let replies = c.send_message(
        "news@x.example",
        &["a@gmail.example", "b@yahoo.example"],
        &spec_tests::client::message("news@x.example", "a@gmail.example", "offline"),
    );
    let id = spec_tests::server::queued_id(replies.last().unwrap());
    let data_dir = d.data_dir.clone();
    let dd = data_dir.to_str().unwrap();

    // While the daemon runs, the store is its alone.
    let (code, _, err) = run_cli(&["queue", "list", "--offline", "--data-dir", dd], None);
    assert_eq!(code, 1);
    assert!(err.contains("open by a running daemon"), "{err}");
    assert!(d.terminate().success());

    let (code, out, err) = run_cli(
        &[
            "queue",
            "show",
            &id,
            "--offline",
            "--json",
            "--data-dir",
            dd,
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["recipients"].as_array().unwrap().len(), 2);
    assert!(v["headers"].as_str().unwrap().contains("Subject: offline"));
    assert!(
        !v["headers"]
            .as_str()
            .unwrap()
            .contains("Hello from the tests"),
        "body shown without --body"
    );

    let (code, out, _) = run_cli(
        &[
            "queue",
            "show",
            &id,
            "--offline",
            "--body",
            "--data-dir",
            dd,
        ],
        None,
    );
    assert_eq!(code, 0);
    assert!(out.contains("Hello from the tests"));

    let (code, out, _) = run_cli(
        &["queue", "summary", "--offline", "--json", "--data-dir", dd],
        None,
    );
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["total"]["messages"], 1);
    assert_eq!(v["total"]["recipients"], 2);
    assert_eq!(v["rows"].as_array().unwrap().len(), 2);

    let (code, out, _) = run_cli(
        &[
            "queue",
            "list",
            "--offline",
            "--domain",
            "yahoo.example",
            "--data-dir",
            dd,
        ],
        None,
    );
    assert_eq!(code, 0);
    assert!(out.contains(&id), "{out}");
    let (code, out, _) = run_cli(
        &[
            "queue",
            "list",
            "--offline",
            "--json",
            "--domain",
            "none.example",
            "--data-dir",
            dd,
        ],
        None,
    );
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "[]");

    let (code, _, err) = run_cli(
        &[
            "queue",
            "show",
            "0000000000000",
            "--offline",
            "--data-dir",
            dd,
        ],
        None,
    );
    assert_eq!(code, 1);
    assert!(err.contains("no message 0000000000000"), "{err}");
    let (code, _, err) = run_cli(
        &["queue", "show", "not-an-id", "--offline", "--data-dir", dd],
        None,
    );
    assert_eq!(code, 1);
    assert!(err.contains("not a queue ID"), "{err}");
    let (code, _, err) = run_cli(
        &["queue", "list", "--offline", "--data-dir", "/no/such/dir"],
        None,
    );
    assert_eq!(code, 1);
    assert!(err.contains("no queue at"), "{err}");
}

#[test]
fn dkim_generate_refuses_rsa_sizes_it_cannot_make_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let kd = dir.path().to_str().unwrap();
    let generate = |selector: &str, bits: &str| {
        run_cli(
            &[
                "dkim",
                "generate",
                "--domain",
                "acme.example",
                "--selector",
                selector,
                "--bits",
                bits,
                "--dir",
                kd,
            ],
            None,
        )
    };
    let (code, out, err) = generate("tiny", "512");
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("512-bit") && err.contains("RFC 8301 §3.2 forbids RSA keys under 1024 bits"),
        "{err}"
    );
    // RFC 8301 allows 1024 bits, but aws-lc-rs, which signs, neither
    // generates nor signs with RSA keys under 2048 bits: refused, saying so.
    let (code, out, err) = generate("old", "1024");
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("1024-bit RSA keys cannot be generated")
            && err.contains("aws-lc-rs")
            && err.contains("use 2048 (the default), 3072 or 4096"),
        "{err}"
    );
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "a refused key left a file"
    );
}
